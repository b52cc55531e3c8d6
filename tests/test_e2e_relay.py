"""End to end relay: the real ``twistd -n pymta``, a loopback DNS server, smtp-sink and pymta's
own server as remote MX hosts; pymta-queue through the control socket."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.dnsserver import DNSServer, Zone
from tests.mta_process import ROOT, MTAProcess, free_port, wait_for_port

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed"),
]

MESSAGE = "From: s@example.org\r\nTo: r@remote.test\r\nSubject: relay\r\n\r\n.dot line\r\nbody\r\n"


class Sink:
    """smtp-sink on 127.0.0.x:port, dumping every message into a directory; stopped by PID."""

    def __init__(self, address: str, port: int) -> None:
        # smtp-sink writes as "nobody": the directory must be reachable for it (not under pytest's 0700 tree).
        directory = tempfile.mkdtemp(prefix="pymta-sink-")
        os.chmod(directory, 0o777)
        self.directory = directory
        self.proc = subprocess.Popen(
            ["/usr/sbin/smtp-sink", "-u", "nobody", "-d", os.path.join(directory, "%M."), f"{address}:{port}", "20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(address, port, 10)

    def messages(self) -> list[bytes]:
        """The messages dumped so far; a file smtp-sink is still writing (the test messages all
        end in a line "body") is left out until it is whole."""
        out = []
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                data = f.read()
            if b"body\r\n" in data or b"body\n" in data:
                out.append(data)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def world(tmp_path):
    port = free_port("127.0.0.7")
    dns = DNSServer(Zone({
        "remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test."]},
        "mx1.remote.test": {"A": ["127.0.0.6"]},  # nothing listens there: fallback to mx2
        "mx2.remote.test": {"A": ["127.0.0.7"]},
        "later.test": {"MX": ["10 mx.later.test."]},
        "mx.later.test": {"A": ["127.0.0.8"]},
    })).start()  # fmt: skip
    sink = Sink("127.0.0.7", port)
    yield dns, sink, port
    sink.stop()
    dns.stop()


def queue_cli(mta: MTAProcess, *args: str) -> subprocess.CompletedProcess:
    return run_cli(mta, "queue_main", *args)


def test_relay_to_the_mx_that_answers_and_account_for_it(tmp_path, world):
    dns, sink, port = world
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port).start()
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("s@example.org", ["r@remote.test"], MESSAGE)
        [dumped] = mta.wait_for(sink.messages, what="delivery at the sink")
        assert b"\r\n.dot line\r\nbody\r\n" in dumped.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
        log = os.path.join(mta.state_dir, "log", "accounting.jsonl")
        events = mta.wait_for(
            lambda: [json.loads(x) for x in open(log).read().splitlines()] if os.path.exists(log) and  # noqa: SIM115 (kept open beyond this block)
            any('"delivered"' in x for x in open(log)) else None, what="accounting records",  # noqa: SIM115 (kept open beyond this block)
        )  # fmt: skip
        kinds = [e["event"] for e in events]
        assert kinds == ["received", "delivered"]
        delivered = events[1]
        assert delivered["mx"] == "mx2.remote.test [127.0.0.7]"
        assert delivered["reply"]["code"] == 250
        assert delivered["recipient"] == "r@remote.test"
        assert delivered["attempt"] == 1
        assert "queue_time" in delivered
        assert delivered["qid"] == events[0]["qid"]
    finally:
        mta.stop()


def test_deferred_mail_is_listed_flushed_and_delivered_after_a_restart(tmp_path, world):
    dns, _sink, port = world
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port).start()
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("s@example.org", ["x@later.test"], MESSAGE)
        mta.wait_for(lambda: mta.queue_files("deferred"), what="deferral (nothing listens at mx.later.test)")
        listing = queue_cli(mta, "list")
        assert listing.returncode == 0, listing.stderr
        assert "x@later.test [deferred]" in listing.stdout
        assert "4.4.1" in listing.stdout
        [qid] = mta.queue_files("deferred")
        # Bring the MX up, restart, flush through the control socket: it is delivered.
        mta.stop()
        later = Sink("127.0.0.8", port)
        try:
            mta.start()
            assert queue_cli(mta, "flush").returncode == 0
            [dumped] = mta.wait_for(later.messages, seconds=30, what="delivery after restart")
            assert b"Subject: relay" in dumped
            mta.wait_for(lambda: not mta.queue_files("deferred"), what="empty queue")
            shown = queue_cli(mta, "show", qid)
            assert shown.returncode == 1
            assert "no message" in shown.stderr
        finally:
            later.stop()
    finally:
        mta.stop()


def test_control_socket_is_private(tmp_path, world):
    dns, _sink, port = world
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port).start()
    try:
        path = os.path.join(mta.state_dir, "control.sock")
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"not json\n")
            assert json.loads(s.recv(4096)) == {"ok": False, "error": "malformed request"}
    finally:
        mta.stop()


def test_the_feedback_loop_end_to_end(tmp_path, world):
    from pymta.feedback.verp import Tagger

    dns, sink, port = world
    secret = "e2e-feedback-secret-0123456789"
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port, extra_config=f"""
        [feedback]
        bounce_domain = "bounces.example.test"
        secret = "{secret}"
        sender_domains = ["example.org"]
        complaint_addresses = ["fbl@example.test"]
        """).start()  # fmt: skip
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.ehlo("app.example.org")
            client.mail("news@example.org")
            client.rcpt("r@remote.test")
            code, text = client.data(MESSAGE.encode())
        qid = text.rsplit(b" ", 1)[1].decode()
        [dumped] = mta.wait_for(sink.messages, what="tagged delivery at the sink")
        assert b"X-Pymta-Trace: " in dumped
        tagger = Tagger(secret, "bounces.example.test")
        return_path = tagger.return_path(qid, "r@remote.test")
        bounce = (
            f"From: MAILER-DAEMON@mx2.remote.test\r\nTo: {return_path}\r\nSubject: Undelivered Mail\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx2.remote.test\r\n\r\n"
            "Final-Recipient: rfc822; r@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n--B--\r\n"
        )
        forged = bounce.replace("r@remote.test", "x@remote.test")
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("", [return_path], bounce)
            client.sendmail("", [return_path], forged)  # names someone the token was not made for
        listing = mta.wait_for(
            lambda: (out := run_cli(mta, "suppress_main", "list").stdout) and "r@remote.test" in out and out,
            what="the recipient suppressed",
        )  # fmt: skip
        assert "r@remote.test\tglobal\tbounce\tuserunknown" in listing
        assert "x@remote.test" not in listing
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.ehlo("app.example.org")
            client.mail("news@example.org")
            code, text = client.rcpt("r@remote.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert b"userunknown" in text
    finally:
        mta.stop()


def run_cli(mta: MTAProcess, main: str, *args: str) -> subprocess.CompletedProcess:
    code = f"import sys; from pymta.admin.cli import {main}; sys.exit({main}())"
    return subprocess.run([sys.executable, "-c", code, "--config", mta.config_path, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip


def test_pool_source_and_shaping_state_through_the_control_socket(tmp_path, world):
    import datetime

    dns, sink, port = world
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port, extra_config=f"""
        [sources.s1]
        address = "127.0.0.11"
        ehlo = "mta11.example.test"
        warmup = [100, 200]
        warmup_start = "{today}"
        [pools.bulk]
        sources = {{ s1 = 1 }}
        [pool_select]
        default = "bulk"
        """).start()  # fmt: skip
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("s@example.org", ["r@remote.test"], MESSAGE)
        [_dumped] = mta.wait_for(sink.messages, what="delivery through the pool's source")
        state = mta.wait_for(
            lambda: (r := queue_cli(mta, "shaping")).returncode == 0 and json.loads(r.stdout)["sources"][0]["sent_today"]
            and json.loads(r.stdout), what="shaping state",
        )  # fmt: skip
        [source] = state["sources"]
        assert source == {"source": "s1", "address": "127.0.0.11", "usable": True, "why_unusable": "",
                          "cap_today": 100, "sent_today": 1, "ladder_offset": 0}  # fmt: skip
        assert any(d["key"] == "mx:mx1.remote.test,mx2.remote.test" for d in state["destinations"])
    finally:
        mta.stop()
