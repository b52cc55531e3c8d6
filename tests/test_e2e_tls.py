"""STARTTLS, implicit TLS and authenticated submission with real handshakes on loopback, using
certificates the test makes."""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pymta.inbound.auth import hash_password
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port, wait_for_port

pytestmark = pytest.mark.timeout(180)


def make_cert(directory: str, name: str = "mx.example.test", serial: int = 1) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(serial).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path + ".new", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path + ".new", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.replace(cert_path + ".new", cert_path)
    os.replace(key_path + ".new", key_path)
    return cert_path, key_path


def client_context(**kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


@pytest.fixture
def mta(tmp_path):
    dns = DNSServer(Zone({}, servfail=["remote.example"])).start()
    cert, key = make_cert(str(tmp_path))
    users = tmp_path / "users"
    users.write_text(f"app:{hash_password('s3cret', n=2**10)}\n")
    tls_port, sub_port = free_port(), free_port()
    proc = MTAProcess(str(tmp_path), dns=dns.address, smtp_extra=f'listen_tls = ["tcp:{tls_port}:interface=127.0.0.1"]',
                      extra_config=f"""
        [tls]
        cert = "{cert}"
        key = "{key}"
        [submission]
        listen = ["tcp:{sub_port}:interface=127.0.0.1"]
        users_file = "{users}"
        """)  # fmt: skip
    proc.start()
    wait_for_port("127.0.0.1", sub_port, 30)
    proc.tls_port, proc.sub_port, proc.dir = tls_port, sub_port, str(tmp_path)
    yield proc
    proc.stop()
    dns.stop()


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and lines[-2][3:4] == b" ":
            break
    return data


def test_plaintext_pipelined_after_starttls_is_discarded(mta):
    with socket.create_connection(("127.0.0.1", mta.port), timeout=10) as raw:
        read_reply(raw)
        raw.sendall(b"EHLO c.example\r\n")
        assert b"STARTTLS" in read_reply(raw)
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        reply = read_reply(raw)
        assert reply.startswith(b"220 2.0.0")
        assert reply.count(b"\r\n") == 1
        tls = client_context().wrap_socket(raw, server_hostname="mx.example.test")
        tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
        assert read_reply(tls).startswith(b"503 5.5.1")  # the session was reset: EHLO first
        tls.sendall(b"EHLO c.example\r\n")
        ehlo = read_reply(tls)
        assert b"STARTTLS" not in ehlo
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(b"QUIT\r\n")


def test_starttls_delivery_is_recorded_as_esmtps(mta):
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.starttls(context=client_context())
        client.sendmail("a@example.org", ["alice@example.test"], "Subject: tls\r\n\r\nhi\r\n")
    [raw] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="delivery")
    assert b"with ESMTPS id" in raw
    assert b"TLSv1." in raw


def handshake(ctx: ssl.SSLContext, port: int) -> str:
    """A TLS handshake with the implicit-TLS listener; the negotiated version. The TCP connection
    is made outside, so a refusal can only come from the handshake itself."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        with ctx.wrap_socket(raw, server_hostname="x") as tls:
            return tls.version()
    finally:
        raw.close()


def test_old_protocols_and_weak_ciphers_are_refused(mta):
    # The listener is alive and speaks modern TLS: the refusals below are about the offer.
    assert handshake(client_context(), mta.tls_port) in ("TLSv1.2", "TLSv1.3")
    old = client_context(maximum_version=ssl.TLSVersion.TLSv1_1, minimum_version=ssl.TLSVersion.TLSv1)
    with contextlib.suppress(ssl.SSLError):
        old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(old, mta.tls_port)
    weak = client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    weak.set_ciphers("AES128-SHA:AES256-SHA:DES-CBC3-SHA")  # no forward secrecy
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(weak, mta.tls_port)


def test_implicit_tls_listener(mta):
    with smtplib.SMTP_SSL("127.0.0.1", mta.tls_port, timeout=30, context=client_context()) as client:
        code, _ = client.ehlo("c.example")
        assert code == 250
        client.sendmail("a@example.org", ["bob@example.test"], "Subject: smtps\r\n\r\nhi\r\n")
    mta.wait_for(lambda: mta.maildir_messages("bob@example.test"), what="delivery over implicit TLS")


def test_submission_requires_tls_then_auth_and_lets_users_relay(mta):
    with smtplib.SMTP("127.0.0.1", mta.sub_port, timeout=30) as client:
        client.ehlo("app.example")
        assert "auth" not in client.esmtp_features
        code, msg = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0app\0s3cret").decode())
        assert (code, msg[:6]) == (538, b"5.7.11")
        code, msg = client.mail("a@example.org")
        assert (code, msg[:5]) == (530, b"5.7.0")
        client.starttls(context=client_context())
        client.ehlo("app.example")
        assert "PLAIN" in client.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("app", "wrong")
        assert info.value.smtp_code == 535
        client.login("app", "s3cret")
        refused = client.sendmail("a@example.org", ["carol@remote.example"], "Subject: sub\r\n\r\nhi\r\n")
        assert refused == {}
    queued = mta.wait_for(lambda: mta.queue_files("deferred") or mta.queue_files("incoming"), what="queued relay")
    _envelope, body = mta.wait_for(lambda: mta.queued_message(queued[0]), what="queued message")
    assert b"(authenticated as app)" in body


def test_repeated_auth_failures_disconnect(mta):
    with smtplib.SMTP("127.0.0.1", mta.sub_port, timeout=30) as client:
        client.starttls(context=client_context())
        client.ehlo("app.example")
        codes = []
        for _ in range(3):
            try:
                code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0app\0nope").decode())
                codes.append(code)
            except smtplib.SMTPServerDisconnected:
                codes.append("closed")
        # The third failure in a row is answered 535, then 421 4.7.0, and the connection closes.
        assert codes == [535, 535, 535]
        code, text = client.noop()  # reads the 421 that followed the third 535
        assert (code, text[:5]) == (421, b"4.7.0")
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            client.noop()


def test_sighup_reloads_the_certificate(mta):
    def serial() -> int:
        with socket.create_connection(("127.0.0.1", mta.tls_port), timeout=10) as raw, client_context().wrap_socket(raw, server_hostname="x") as tls:
            der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number

    assert serial() == 1
    make_cert(mta.dir, serial=2)
    os.kill(mta.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while serial() != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert serial() == 2


def test_a_bad_certificate_is_a_one_line_startup_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    proc = MTAProcess(str(tmp_path), extra_config=f'[tls]\ncert = "{bad}"\nkey = "{bad}"\n')
    result = subprocess.run(proc.twistd_command(), capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{bad}: not a usable PEM certificate chain" in result.stderr


OPEN_RELAY_BATTERY = [
    "<victim@remote.example>",
    "<VICTIM@REMOTE.EXAMPLE>",
    "<victim%remote.example@example.test>",
    "<remote.example!victim@example.test>",
    '<"victim@remote.example">',
    '<"victim@remote.example"@example.test>',
    "<@example.test:victim@remote.example>",
    "<@example.test,@mx.example.test:victim@remote.example>",
    "<victim@[192.0.2.1]>",
    "<victim@[IPv6:2001:db8::1]>",
    "<victim@remote.example.>",
]


@pytest.fixture
def untrusted_mta(tmp_path):
    """127.0.0.1 is not in relay_from here, so the test client is a stranger."""
    cert, key = make_cert(str(tmp_path))
    proc = MTAProcess(str(tmp_path), extra_config=f'[tls]\ncert = "{cert}"\nkey = "{key}"\n',
                      relay_from="192.0.2.0/24").start()  # fmt: skip
    yield proc
    proc.stop()


@pytest.mark.parametrize("tls", [False, True])
def test_open_relay_battery_from_a_stranger_is_refused(untrusted_mta, tls):
    with smtplib.SMTP("127.0.0.1", untrusted_mta.port, timeout=30) as client:
        client.ehlo("stranger.example")
        if tls:
            client.starttls(context=client_context())
            client.ehlo("stranger.example")
        assert client.mail("someone@example.org")[0] == 250
        for path in OPEN_RELAY_BATTERY:
            code, text = client.docmd("RCPT", f"TO:{path}")
            assert 500 <= code < 600, (path, code, text)
            assert text[:2] == b"5.", (path, text)
        assert client.docmd("RCPT", "TO:<alice@example.test>")[0] == 250


def test_garbage_and_stalled_handshakes_close_only_their_own_connection(tmp_path):
    cert, key = make_cert(str(tmp_path))
    mta = MTAProcess(str(tmp_path), extra_config=f'[tls]\ncert = "{cert}"\nkey = "{key}"\n',
                     smtp_extra='command_timeout = "2s"').start()  # fmt: skip
    try:
        garbage = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
        stalled = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
        for sock in (garbage, stalled):
            read_reply(sock)
            sock.sendall(b"EHLO c.example\r\n")
            read_reply(sock)
            sock.sendall(b"STARTTLS\r\n")
            assert read_reply(sock).startswith(b"220")
        garbage.sendall(b"\x16\x03\x01 this is not a TLS client hello \x00\xff" * 20)
        # Meanwhile another client is served as usual.
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("a@example.org", ["alice@example.test"], "Subject: ok\r\n\r\nfine\r\n")
        for sock in (garbage, stalled):  # both are closed by the server, the stalled one by its timeout
            sock.settimeout(15)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    if not sock.recv(4096):
                        break
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise AssertionError("the server kept a broken TLS connection open") from None
            else:
                raise AssertionError("the server kept a broken TLS connection open")
            sock.close()
        mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="the other client's mail")
    finally:
        mta.stop()


@pytest.mark.skipif(shutil.which("testssl") is None, reason="testssl.sh (Debian package) not installed")
def test_testssl_finds_no_weak_protocol_or_cipher(mta):
    proc = subprocess.run(
        ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--starttls", "smtp", "-p", "-s", "-f",
         f"127.0.0.1:{mta.port}"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = proc.stdout
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.strip()}
    for protocol in ("SSLv2", "SSLv3", "TLS 1", "TLS 1.1"):
        assert "not offered" in lines.get(protocol, ""), (protocol, out[-3000:])

    def offered(line: str) -> bool:
        return " offered" in line and "not offered" not in line

    assert offered(lines.get("TLS 1.2", "")) or offered(lines.get("TLS 1.3", "")), out[-3000:]
    for category in ("NULL ciphers", "Anonymous NULL", "Export ciphers", "LOW: 64 Bit", "Triple DES"):
        [line] = [v for k, v in lines.items() if k.startswith(category)]
        assert "not offered" in line, line
    assert any("FS is offered" in v and "not" not in v for v in lines.values()), out[-3000:]


def test_tls_starts_without_a_legacy_context_factory_warning(mta):
    with socket.create_connection(("127.0.0.1", mta.port), timeout=10) as raw:
        read_reply(raw)
        raw.sendall(b"EHLO c.example\r\n")
        read_reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(raw).startswith(b"220")
        with client_context().wrap_socket(raw, server_hostname="mx.example.test") as tls:
            tls.sendall(b"EHLO c.example\r\n")
            assert read_reply(tls).startswith(b"250")
    with socket.create_connection(("127.0.0.1", mta.tls_port), timeout=10) as raw, client_context().wrap_socket(raw, server_hostname="mx.example.test") as tls:
        assert read_reply(tls).startswith(b"220")
    mta.stop()
    with open(os.path.join(mta.dir, "twistd.stderr"), encoding="utf-8", errors="replace") as f:
        output = f.read()
    output += "".join(e["message"] for e in mta.log_events())
    assert "Stopping factory" in output  # the logs were read
    assert "LegacyContextFactoryWarning" not in output
    assert "does not explicitly provide" not in output
