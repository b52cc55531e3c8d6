"""End to end: SIGTERM with deliveries in flight to a slow receiver, with and without listener
workers; the process tree is gone in time, every outcome is on disk, nothing is delivered twice."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import threading
import time

import pytest

from tests.mta_process import MTAProcess, free_port, port_is_free, wait_until
from tests.smtp_receiver import ScriptedReceiver

pytestmark = pytest.mark.timeout(240)

GRACE = 3.0


class SlowReceiver(ScriptedReceiver):
    """A loopback SMTP server that answers the end of data late: a message whose Subject contains
    "slow" after ``slow`` seconds, the others once ``release`` is set. It counts a message as
    delivered only once its 250 was sent. Every wait and loop is bounded."""

    name = b"slow.test"
    ehlo_keywords = (b"PIPELINING",)

    def __init__(self, slow: float = 60.0) -> None:
        self.slow = slow
        self.release = threading.Event()
        self.delivered: list[str] = []  # subjects, in the order of their 250
        self.in_data = 0  # messages whose final dot arrived and that wait for their answer
        super().__init__()

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        with self.lock:
            self.in_data += 1
        try:
            if "slow" in subject_of(message):
                self.hold(conn, self.slow)
            else:
                self.hold(conn, 60.0, until=self.release)
            return b"250 accepted"
        finally:
            with self.lock:
                self.in_data -= 1

    def on_answered(self, recipients: list[str], message: bytes, peer: str) -> None:
        with self.lock:
            self.delivered.append(subject_of(message))


def subject_of(message: bytes) -> str:
    return next((x[9:].decode() for x in message.split(b"\r\n") if x.startswith(b"Subject: ")), "?")


def pid_is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def accounting(mta: MTAProcess) -> list[dict]:
    path = os.path.join(mta.state_dir, "log", "accounting.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("s@example.org", ["r@remote.test"], f"From: s@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n")


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_with_slow_deliveries_stops_in_time_and_delivers_nothing_twice(tmp_path, processes):
    receiver = SlowReceiver(slow=60.0)
    config = (f'[queue]\nshutdown_grace = "{GRACE}s"\nretry_initial = "1s"\n'
              f'[routes]\n"remote.test" = "127.0.0.1:{receiver.port}"\n')  # fmt: skip
    mta = MTAProcess(str(tmp_path), extra_config=config, smtp_extra=f"processes = {processes}")
    try:
        mta.start()
        subjects = ["quick-1", "quick-2", "quick-3", "slow-1", "slow-2"]
        for subject in subjects:
            send(mta.port, subject)
        # The destination starts with two connections (slow start): the first two are in flight.
        wait_until(lambda: receiver.in_data == 2, 30, "two messages at the receiver's end of data")
        workers = []
        if processes > 1:
            workers = [e["pid"] for e in mta.log_events() if e.get("pid") and "listener worker" in e.get("message", "")]
            assert len(workers) == processes - 1
        # A session in progress is told the service closes.
        idle = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
        assert idle.recv(512).startswith(b"220")
        idle.sendall(b"EHLO client.test\r\n")
        assert idle.recv(512).startswith(b"250")

        started = time.monotonic()
        pid = mta.proc.pid
        mta.proc.send_signal(signal.SIGTERM)
        # Listeners close at once, while the slow deliveries still hold the process.
        wait_until(lambda: port_is_free("127.0.0.1", mta.port), 2.0, "the listener to close")
        assert mta.proc.poll() is None
        mta.proc.send_signal(signal.SIGTERM)  # a second one is harmless
        receiver.release.set()  # the quick ones are answered within the grace, the slow ones not
        idle.settimeout(GRACE + 5)
        assert idle.recv(512).startswith(b"421 4.3.2")
        idle.close()
        mta.proc.wait(GRACE + 5 + 2)
        elapsed = time.monotonic() - started
        assert elapsed < GRACE + 5, elapsed
        for worker in workers:
            wait_until(lambda w=worker: pid_is_gone(w), 3, f"listener worker {worker} to exit")
        assert pid_is_gone(pid)
        mta.stop()

        # Those in flight finished within the grace, and each one answered is recorded delivered;
        # those that did not are recorded deferred.
        first_run = list(receiver.delivered)
        assert {"quick-1", "quick-2"} <= set(first_run)
        assert not any("slow" in s for s in first_run)
        records = accounting(mta)
        assert [r["event"] for r in records].count("delivered") == len(first_run)
        deferred = [r for r in records if r["event"] == "deferred"]
        assert len(deferred) == len(subjects) - len(first_run)
        assert all(r["reply"]["code"] // 100 == 4 for r in deferred)
        output = open(os.path.join(str(tmp_path), "twistd.stderr"), encoding="utf-8", errors="replace").read()  # noqa: SIM115 (kept open beyond this block)
        output += open(mta.log_path, encoding="utf-8").read()  # noqa: SIM115 (kept open beyond this block)
        assert "ReactorNotRunning" not in output
        assert "Traceback" not in output
        # No "Starting factory" / "Stopping factory" line per outbound connection.
        factories = {e["namespace"] for e in mta.log_events() if "factory" in e["message"]}
        assert factories
        assert all(n.startswith(("pymta.smtp.server", "pymta.admin.control")) for n in factories)

        # After a restart with a prompt receiver, the rest is delivered, and nothing twice.
        receiver.slow = 0.0
        mta.start()
        wait_until(lambda: len(receiver.delivered) >= len(subjects), 60, "the deferred mail to be delivered")
        mta.wait_for(lambda: not any(mta.queue_files(s) for s in ("incoming", "active", "deferred")), what="empty queue")
        assert sorted(receiver.delivered) == sorted(subjects)
    finally:
        mta.stop()
        receiver.stop()


def test_a_second_mta_on_the_same_state_dir_or_port_fails_in_one_line(tmp_path):
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    mta = MTAProcess(str(a_dir)).start()
    try:
        # Same state_dir, another port: the lock file says who holds it.
        other = MTAProcess(str(a_dir), port=free_port())
        proc = _run_to_exit(other)
        assert proc[0] == 2
        [line] = proc[1].strip().splitlines()
        assert "in use by another running pymta" in line
        assert os.path.join(mta.state_dir, "pymta.lock") in line
        assert str(mta.proc.pid) in line
        # Another state_dir, the same port.
        b_dir = tmp_path / "b"
        b_dir.mkdir()
        clash = MTAProcess(str(b_dir), port=mta.port)
        code, text = _run_to_exit(clash)
        assert code == 2
        [line] = text.strip().splitlines()
        assert f"tcp:{mta.port}:interface=127.0.0.1" in line
        assert "smtp.listen" in line
        assert "in use" in line
    finally:
        mta.stop()


def _run_to_exit(mta: MTAProcess) -> tuple[int, str]:
    import subprocess

    env = dict(os.environ, PYMTA_LOG_FILE=mta.log_path + ".other")
    proc = subprocess.run(mta.twistd_command(), cwd=mta.workdir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc.returncode, proc.stderr + proc.stdout


def test_unreadable_certificate_key_is_named_in_one_line(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    mta = MTAProcess(str(tmp_path), extra_config=f'[tls]\ncert = "{cert}"\nkey = "{tmp_path}/missing-key.pem"\n')
    code, text = _run_to_exit(mta)
    assert code == 2
    [line] = text.strip().splitlines()
    assert re.search(r"pymta\.toml: tls\.key: .*missing-key\.pem: no such file", line), line
