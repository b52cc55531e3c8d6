"""End to end: the real ``twistd -n pymta`` on loopback, mail sent with smtplib and swaks."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess

import pytest

from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, port_is_free, wait_gone

pytestmark = pytest.mark.timeout(180)

MESSAGE = (
    "From: Someone <someone@example.org>\r\n"
    "To: Alice <alice@example.test>\r\n"
    "Subject: hello\r\n"
    "Message-ID: <e2e-1@example.org>\r\n"
    "\r\n"
    "First line.\r\n"
    ".A line that starts with a dot.\r\n"
    "..two dots.\r\n"
    "Last line.\r\n"
)


@pytest.fixture
def dns_server():
    """Loopback DNS: remote.example answers SERVFAIL (mail for it waits), everything else NXDOMAIN."""
    server = DNSServer(Zone({}, servfail=["remote.example"])).start()
    yield server
    server.stop()


@pytest.fixture
def mta(tmp_path, dns_server):
    proc = MTAProcess(str(tmp_path), dns=dns_server.address).start()
    yield proc
    proc.stop()


def body_of(raw: bytes) -> bytes:
    """Maildir files hold LF line ends (the local convention); compare with the CRLF we sent."""
    return raw.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def test_smtplib_delivers_into_the_local_maildir(mta):
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        code, caps = client.ehlo("client.example.org")
        assert code == 250
        for ext in (b"PIPELINING", b"SIZE", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES", b"CHUNKING", b"DSN"):
            assert ext in caps
        refused = client.sendmail("someone@example.org", ["alice@example.test"], MESSAGE)
        assert refused == {}
    messages = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="maildir delivery")
    raw = messages[0]
    assert body_of(raw) == MESSAGE.split("\r\n\r\n", 1)[1].encode()
    headers = raw.split(b"\n\n", 1)[0]
    assert b"Delivered-To: alice@example.test" in headers
    assert b"Return-Path: <someone@example.org>" in headers
    assert b"Received: from client.example.org" in headers
    assert b"by mx.example.test (pymta) with ESMTP id " in headers
    # Delivered and done: nothing left in the queue.
    mta.wait_for(lambda: not mta.queue_files("incoming") and not mta.queue_files("active"), what="empty queue")
    assert mta.queue_files("deferred") == []


def test_reply_to_data_names_the_queue_id_and_is_logged_as_json(mta):
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(MESSAGE.encode())
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: queued as ")
    qid = text.rsplit(b" ", 1)[1].decode()

    def queued_event():
        return [e for e in mta.log_events() if e.get("event") == "queued" and e.get("qid") == qid]

    event = mta.wait_for(queued_event, what="queued log event")[0]
    assert event["sender"] == "someone@example.org"
    assert event["recipients"] == ["bob@example.test"]
    assert event["client"] == "127.0.0.1"
    assert event["code"] == 250
    assert event["enhanced"] == "2.0.0"
    assert event["size"] > len(MESSAGE)


def test_unknown_mailbox_and_relay_attempts_are_refused_and_logged(mta):
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org")
        code, text = client.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("x@[192.0.2.1]")
        assert code == 250  # 127.0.0.1 is in relay_from: literal domains relay, never deliver locally
        client.rset()
    rejections = mta.wait_for(
        lambda: [e for e in mta.log_events() if e.get("event") == "reject"], what="reject log event"
    )
    assert rejections[0]["rcpt"] == "nobody@example.test"
    assert rejections[0]["enhanced"] == "5.1.1"
    mta.stop()  # everything logged is in the file
    rejections = [e for e in mta.log_events() if e.get("event") == "reject"]
    assert len(rejections) == 1  # one event per reject, not one per layer that saw it


def test_relay_mail_from_a_trusted_client_waits_safely_in_the_queue(mta):
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org", ["SIZE=300", "RET=HDRS", "ENVID=abc+2Bdef"])
        client.rcpt("carol@remote.example", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;carol@remote.example"])
        code, text = client.data(MESSAGE.encode())
    assert code == 250
    qid = text.rsplit(b" ", 1)[1].decode()
    envelope, body = mta.wait_for(lambda: mta.queued_message(qid), what="queued envelope")
    assert envelope["sender"] == "someone@example.org"
    assert envelope["ret"] == "HDRS"
    assert envelope["envid"] == "abc+def"
    [rcpt] = envelope["recipients"]
    assert rcpt["address"] == "carol@remote.example"
    assert rcpt["route"] == "relay"
    assert sorted(rcpt["notify"]) == ["DELAY", "FAILURE"]
    assert rcpt["state"] not in ("delivered", "failed")
    assert body.endswith(MESSAGE.encode())


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks (Debian package) not installed")
def test_swaks_delivers_with_pipelining_and_chunking_variants(mta):
    for extra in ([], ["--pipeline"], ["--protocol", "SMTP"]):
        proc = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{mta.port}", "--from", "someone@example.org",
             "--to", "alice@example.test", "--helo", "swaks.example.org", "--header", "Subject: swaks",
             "--timeout", "20", *extra],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "250 2.0.0 Ok: queued as" in proc.stdout
    messages = mta.wait_for(
        lambda: (m := mta.maildir_messages("alice@example.test")) and len(m) >= 3 and m, what="3 deliveries"
    )
    assert all(b"Subject: swaks" in m for m in messages)
    assert any(b"with SMTP id" in m for m in messages)


def test_sigkill_leaves_no_process_or_port_and_a_restart_keeps_what_was_queued(tmp_path, dns_server):
    mta = MTAProcess(str(tmp_path), dns=dns_server.address, smtp_extra="processes = 2").start()
    workers = mta.wait_for(lambda: mta.children() if len(mta.children()) == 1 else None, what="one listener worker")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.sendmail("someone@example.org", ["carol@remote.example"], MESSAGE)
    mta.stop(signal.SIGKILL)
    # One process tree: nothing it started survives it, the port is free again.
    survivors = wait_gone(workers)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "a listener worker outlived the main process"
    assert port_is_free("127.0.0.1", mta.port)
    queued_before = sorted(
        name for s in ("incoming", "active", "deferred") for name in mta.queue_files(s)
    )
    assert len(queued_before) == 1
    # Restart over the same state: the acknowledged message is still queued, nothing is lost,
    # and the leftovers of the crash are cleared.
    mta.start()
    try:
        mta.wait_for(lambda: os.listdir(os.path.join(mta.state_dir, "queue", "tmp")) == [], what="tmp/ cleared")
        queued_after = sorted(name for s in ("incoming", "active", "deferred") for name in mta.queue_files(s))
        assert queued_after == queued_before
    finally:
        mta.stop()


def test_listener_workers_share_the_port_deliver_through_the_main_process_and_die_with_it(tmp_path, dns_server):
    mta = MTAProcess(str(tmp_path), dns=dns_server.address, smtp_extra="processes = 2").start()
    pid = mta.proc.pid
    try:
        children = mta.wait_for(lambda: mta.children() if len(mta.children()) == 1 else None, what="one listener worker")
        # With the main process frozen, only the worker can answer: the mail is accepted...
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(3):
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
                    client.sendmail("someone@example.org", ["alice@example.test"], MESSAGE.replace("hello", f"hello {i}"))
        finally:
            os.kill(pid, signal.SIGCONT)
        # ... and the main process delivers it once it runs again (it sees the worker's mail at once).
        mta.wait_for(lambda: len(mta.maildir_messages("alice@example.test")) == 3, what="3 deliveries")
    finally:
        mta.stop(signal.SIGKILL)
    survivors = wait_gone(children)
    for worker in survivors:
        os.kill(worker, signal.SIGKILL)
    assert survivors == [], "the listener worker outlived the main process"
    assert port_is_free("127.0.0.1", mta.port)
