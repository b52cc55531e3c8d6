"""Submission as mail clients use it, through the real twistd with a generated certificate:
implicit TLS on a 465-style ``ssl:`` listener (AUTH inside TLS, no STARTTLS), STARTTLS on a
587-style one, and ``sender_login = "strict"`` refusing senders the user does not own, with
Debian's ``swaks`` and ``msmtp`` as the clients."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from pymta.inbound.auth import hash_password
from tests.mta_process import MTAProcess, free_port, wait_for_port
from tests.test_e2e_tls import client_context, make_cert, read_reply

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def mta(tmp_path):
    cert, key = make_cert(str(tmp_path))
    stored = hash_password("s3cret", n=2**10)
    users = tmp_path / "users"
    users.write_text(f"app:{stored}:news@example.test\nalice@example.test:{stored}\n")
    port_465, port_587 = free_port(), free_port()
    proc = MTAProcess(str(tmp_path), relay_from="192.0.2.0/24", extra_config=f"""
        [tls]
        cert = "{cert}"
        key = "{key}"
        [submission]
        listen = ["ssl:{port_465}:interface=127.0.0.1", "tcp:{port_587}:interface=127.0.0.1"]
        users_file = "{users}"
        sender_login = "strict"
        """)  # fmt: skip
    proc.start()
    wait_for_port("127.0.0.1", port_465, 30)
    wait_for_port("127.0.0.1", port_587, 30)
    proc.port_465, proc.port_587, proc.dir = port_465, port_587, str(tmp_path)
    yield proc
    proc.stop()


def ehlo_lines(sock: socket.socket) -> list[bytes]:
    assert read_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")
    return [line[4:] for line in read_reply(sock).split(b"\r\n") if line]


def test_implicit_tls_offers_auth_inside_tls_and_no_starttls(mta):
    with socket.create_connection(("127.0.0.1", mta.port_465), timeout=10) as raw, client_context().wrap_socket(raw, server_hostname="mx.example.test") as tls:
        lines = ehlo_lines(tls)
        assert b"AUTH PLAIN LOGIN" in lines, lines
        assert b"STARTTLS" not in lines, lines
        tls.sendall(b"STARTTLS\r\n")
        assert read_reply(tls)[:3] in (b"503", b"502")  # already encrypted
    with socket.create_connection(("127.0.0.1", mta.port_587), timeout=10) as raw:  # 587: STARTTLS first
        lines = ehlo_lines(raw)
        assert b"STARTTLS" in lines, lines
        assert not any(line.startswith(b"AUTH") for line in lines), lines


def swaks(mta, port: int, sender: str, from_header: str | None = None, user: str = "app") -> subprocess.CompletedProcess:
    tls = ["--tls-on-connect"] if port == mta.port_465 else ["--tls"]
    header = ["--h-From:", from_header] if from_header else []
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", *tls, "--auth", "PLAIN", "--auth-user", user,
         "--auth-password", "s3cret", "--from", sender, "--to", "bob@example.test", *header,
         "--h-Subject", f"via {port} as {sender}", "--timeout", "20"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (tests/run.sh installs it)")
@pytest.mark.parametrize("which", ["port_465", "port_587"])
def test_swaks_sends_as_an_owned_address_and_is_refused_553_for_others(mta, which):
    port = getattr(mta, which)
    sent = swaks(mta, port, "news@example.test")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "250 2.0.0 Ok: queued" in sent.stdout
    refused = swaks(mta, port, "ceo@example.test")
    assert refused.returncode != 0
    assert "553 5.7.1 <ceo@example.test>: Sender address rejected" in refused.stdout
    forged = swaks(mta, port, "news@example.test", from_header="The CEO <ceo@example.test>")
    assert forged.returncode != 0
    assert "553 5.7.1 From: <ceo@example.test>" in forged.stdout
    as_login = swaks(mta, port, "Alice@Example.Test", user="alice@example.test")  # the login name is owned
    assert as_login.returncode == 0, as_login.stdout
    messages = mta.wait_for(lambda: len(mta.maildir_messages("bob@example.test")) == 2 and mta.maildir_messages("bob@example.test"),
                            what="the two allowed messages")  # fmt: skip
    assert all(b"(authenticated as " in m and b"with ESMTPSA" in m for m in messages)
    assert not any(b"ceo@example.test" in m for m in messages)


def msmtp(mta, port: int, sender: str, from_header: str) -> subprocess.CompletedProcess:
    conf = os.path.join(mta.dir, f"msmtprc-{port}")
    with open(conf, "w") as f:
        f.write(f"""defaults
tls on
tls_starttls {"off" if port == mta.port_465 else "on"}
tls_certcheck off
account default
host 127.0.0.1
port {port}
auth plain
user app
password s3cret
from {sender}
""")
    os.chmod(conf, 0o600)
    message = f"From: {from_header}\r\nTo: bob@example.test\r\nSubject: msmtp {port} {from_header}\r\n\r\nhello\r\n"
    return subprocess.run(["msmtp", "-C", conf, "bob@example.test"], input=message, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp not installed (tests/run.sh installs it)")
@pytest.mark.parametrize("which", ["port_465", "port_587"])
def test_msmtp_sends_as_an_owned_address_and_is_refused_for_others(mta, which):
    port = getattr(mta, which)
    sent = msmtp(mta, port, "news@example.test", "News <news@example.test>")
    assert sent.returncode == 0, sent.stderr
    refused = msmtp(mta, port, "ceo@example.test", "ceo@example.test")
    assert refused.returncode != 0, refused.stderr
    assert "553 5.7.1" in refused.stderr, refused.stderr
    forged = msmtp(mta, port, "news@example.test", "ceo@example.test")
    assert forged.returncode != 0, forged.stderr
    assert "553 5.7.1" in forged.stderr, forged.stderr
    [message] = mta.wait_for(lambda: mta.maildir_messages("bob@example.test"), what="the allowed message")
    assert f"Subject: msmtp {port} News <news@example.test>".encode() in message
