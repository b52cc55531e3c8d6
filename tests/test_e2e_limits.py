"""End to end through ``twistd -n pymta`` on loopback: the connection cap ([smtp] max_connections,
split between listener workers) and the free-space check at MAIL ([queue] min_free)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from tests.mta_process import MTAProcess

pytestmark = pytest.mark.timeout(180)


def first_line(sock: socket.socket) -> bytes:
    """The server's first reply line (bounded: 512 octets, the socket's timeout)."""
    data = b""
    while b"\r\n" not in data and len(data) < 512:
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def connect(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock, first_line(sock)


@pytest.fixture
def held():
    """Client sockets kept open by a test; all closed at its end."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def test_connections_past_max_connections_get_421_470_until_one_closes(tmp_path, held):
    mta = MTAProcess(str(tmp_path), smtp_extra="max_connections = 3").start()

    def greeted_again():
        sock, line = connect(mta.port)
        if line.startswith(b"220 "):
            held.append(sock)
            return True
        sock.close()  # the port probe of start() may not have been seen closing yet
        return False

    try:
        for _ in range(3):
            mta.wait_for(greeted_again, what="a session")
        extra, refused = connect(mta.port)
        assert refused == b"421 4.7.0 Too many connections, try again later"
        assert extra.recv(512) == b""  # and closed
        extra.close()
        held.pop().close()
        mta.wait_for(greeted_again, what="a free slot after a session closed")
        assert any(e.get("event") == "reject" and e.get("code") == 421 and e.get("enhanced") == "4.7.0"
                   for e in mta.wait_for(mta.log_events, what="log events"))  # fmt: skip
    finally:
        mta.stop()


def test_the_listener_workers_take_max_connections_and_the_main_process_does_not_accept(tmp_path, held):
    mta = MTAProcess(str(tmp_path), smtp_extra="processes = 2\nmax_connections = 4").start()
    pid = mta.proc.pid

    def first_lines(count: int) -> list[bytes]:
        lines = []
        for _ in range(count):
            sock, line = connect(mta.port)
            held.append(sock)
            lines.append(line[:9])
        return lines

    try:
        workers = mta.wait_for(
            lambda: subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split(),
            what="a listener worker",
        )  # fmt: skip
        # Listening (the socket queued connections before: the start-up probe's is handled by now).
        mta.wait_for(lambda: [e for e in mta.log_events() if e["message"].startswith(
            f"SMTPServerFactory starting on {mta.port}")], seconds=90, what="the worker listening")  # fmt: skip
        # The main process delivers: stopped, it leaves every session to the one worker, which has
        # all ceil(4 / 1) = 4 slots.
        os.kill(pid, signal.SIGSTOP)
        try:
            lines = first_lines(6)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert lines == [b"220 mx.ex"] * 4 + [b"421 4.7.0"] * 2
        assert len(workers) == 1
    finally:
        mta.stop()


def test_a_main_process_that_does_not_deliver_accepts_beside_its_worker(tmp_path, held):
    mta = MTAProcess(str(tmp_path), smtp_extra="processes = 2", extra_config="[queue]\ndeliver = false\n").start()
    try:
        [worker] = mta.wait_for(mta.children, what="a listener worker")
        mta.wait_for(lambda: len([e for e in mta.log_events() if e["message"].startswith(
            f"SMTPServerFactory starting on {mta.port}")]) == 2, seconds=90, what="both processes listening")  # fmt: skip
        os.kill(worker, signal.SIGSTOP)  # only the main process can accept now
        try:
            sock, line = connect(mta.port)
            held.append(sock)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert line[:9] == b"220 mx.ex"
    finally:
        mta.stop()


def test_mail_is_refused_452_431_before_the_body_when_the_queue_disk_is_short(tmp_path):
    mta = MTAProcess(str(tmp_path), extra_config='[queue]\nmin_free = "1000000000GB"\n').start()
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.ehlo("client.example.org")
            code, text = client.mail("someone@example.org")
            assert (code, text[:5]) == (452, b"4.3.1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.get("event") == "storage_low" for e in mta.log_events()):
            time.sleep(0.05)
        assert any(e.get("event") == "storage_low" and e.get("needed", 0) > 10**18 for e in mta.log_events())
        assert mta.queue_files("incoming") == []
    finally:
        mta.stop()
