"""MTA-STS end to end through the real ``twistd -n pymta``: the loopback DNS server announces a
policy, an HTTPS policy host (Python's http.server with a certificate from the tests' CA, on the
port ``[outbound] mta_sts_port`` names) serves it, and a small threaded SMTP receiver with or
without STARTTLS plays the MX. Enforce keeps the mail queued (``4.7.5``, shown by pymta-queue)
until the MX offers TLS with a certificate for its name; then a flush delivers it over TLS."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import smtplib
import socket
import socketserver
import ssl
import threading

import pytest

from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port, wait_for_port
from tests.pki import make_ca
from tests.test_e2e_relay import queue_cli

pytestmark = pytest.mark.timeout(180)

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n"


class PolicyHost:
    """HTTPS on 127.0.0.6:port serving the policy, in a thread."""

    def __init__(self, port: int, cert: tuple[str, str]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(self.path)
                self.send_response(200 if self.path == "/.well-known/mta-sts.txt" else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(POLICY)))
                self.end_headers()
                self.wfile.write(POLICY)

            def log_message(self, *args) -> None:
                pass

        host = self
        self.requests: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.6", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class Receiver:
    """A minimal SMTP server in a thread: STARTTLS offered when given a certificate; records each
    message with whether it came over TLS."""

    def __init__(self, address: str, port: int, cert: tuple[str, str] | None, requiretls: bool = False) -> None:
        receiver = self
        self.messages: list[tuple[bool, bytes]] = []
        self.mail_lines: list[bytes] = []
        self.connections: list = []
        context = None
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*cert)

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")
                self.wfile.flush()

            def handle(self) -> None:
                tls = False
                receiver.connections.append(self.connection)
                self.reply("220 mx.sts.test ESMTP")
                for _ in range(100):  # bounded dialogue
                    line = self.rfile.readline(1000)
                    if not line:
                        return
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        offer = ["250-mx.sts.test", "250-PIPELINING"] + (["250-STARTTLS"] if context and not tls else [])
                        offer += ["250-REQUIRETLS"] if requiretls and tls else []
                        for x in [*offer, "250 8BITMIME"]:
                            self.reply(x)
                    elif verb == b"STAR" and context is not None:
                        self.reply("220 go ahead")
                        self.connection = context.wrap_socket(self.connection, server_side=True)
                        receiver.connections.append(self.connection)
                        self.rfile = self.connection.makefile("rb")
                        self.wfile = self.connection.makefile("wb")
                        tls = True
                    elif verb == b"MAIL":
                        receiver.mail_lines.append(line.strip())
                        self.reply("250 ok")
                    elif verb == b"DATA":
                        self.reply("354 go on")
                        data = b""
                        while not data.endswith(b"\r\n.\r\n") and len(data) < 1 << 20:
                            chunk = self.rfile.readline(1 << 16)
                            if not chunk:
                                return
                            data += chunk
                        receiver.messages.append((tls, data))
                        self.reply("250 2.0.0 taken")
                    elif verb == b"QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("250 ok")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        wait_for_port(address, port, 10)

    def stop(self) -> None:
        """Stop listening and cut the open connections (a client's idle pooled session too)."""
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)


def test_enforce_holds_mail_for_a_plaintext_mx_then_delivers_over_verified_tls(tmp_path):
    ca = make_ca(str(tmp_path))
    smtp_port = free_port("127.0.0.2")
    https_port = free_port("127.0.0.6")
    dns = DNSServer(Zone({
        "sts.test": {"MX": ["10 mx.sts.test."]},
        "_mta-sts.sts.test": {"TXT": ['"v=STSv1; id=e2e1;"']},
        "mta-sts.sts.test": {"A": ["127.0.0.6"]},
        "mx.sts.test": {"A": ["127.0.0.2"]},
    })).start()  # fmt: skip
    policy_host = PolicyHost(https_port, ca.issue("mta-sts.sts.test"))
    plain = Receiver("127.0.0.2", smtp_port, None)
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=smtp_port)
    try:
        with open(mta.config_path) as f:
            text = f.read()
        with open(mta.config_path, "w") as f:  # into MTAProcess's [outbound] table
            f.write(text.replace(f"smtp_port = {smtp_port}\n", f'smtp_port = {smtp_port}\ntls_ca_file = "{ca.cert_path}"\n'
                                                                 f"mta_sts_port = {https_port}\n", 1))  # fmt: skip
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("s@example.org", ["r@sts.test"], "Subject: sts\r\n\r\nbody\r\n")
        mta.wait_for(lambda: mta.queue_files("deferred"), what="deferral under enforce")
        assert plain.messages == []
        assert policy_host.requests == ["/.well-known/mta-sts.txt"]
        [qid] = mta.queue_files("deferred")
        shown = queue_cli(mta, "show", qid)
        assert shown.returncode == 0, shown.stderr
        reply = json.loads(shown.stdout)["recipients"][0]["reply"]
        assert (reply["enhanced"], reply["tls_policy"]) == ("4.7.5", "mta-sts")
        assert "MTA-STS" in reply["text"]
        assert os.path.isfile(os.path.join(mta.state_dir, "mta-sts", "sts.test.json"))  # cached on disk
        plain.stop()
        secure = Receiver("127.0.0.2", smtp_port, ca.issue("mx.sts.test"))
        try:
            assert queue_cli(mta, "flush").returncode == 0
            [(tls, data)] = mta.wait_for(lambda: secure.messages, what="delivery over TLS")
            assert tls
            assert b"Subject: sts" in data
            log = os.path.join(mta.state_dir, "log", "accounting.jsonl")
            records = mta.wait_for(lambda: [json.loads(x) for x in open(log).read().splitlines()  # noqa: SIM115 (kept open beyond this block)
                                            if '"delivered"' in x], what="the delivered record")  # fmt: skip
            assert records[0]["tls_policy"] == "mta-sts"
            assert records[0]["tls"]
        finally:
            secure.stop()
    finally:
        mta.stop()
        plain.stop()
        policy_host.stop()
        dns.stop()


def test_requiretls_end_to_end_accepted_over_tls_only_and_held_for_a_hop_without_it(tmp_path):
    ca = make_ca(str(tmp_path))
    smtp_port = free_port("127.0.0.2")
    dns = DNSServer(Zone({"rt.test": {"MX": ["10 mx.rt.test."]}, "mx.rt.test": {"A": ["127.0.0.2"]}})).start()
    mx_cert = ca.issue("mx.rt.test")
    cert, key = ca.issue("mx.example.test")
    old = Receiver("127.0.0.2", smtp_port, mx_cert)  # TLS, but no REQUIRETLS
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=smtp_port,
                     extra_config=f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')  # fmt: skip
    try:
        with open(mta.config_path) as f:
            text = f.read()
        with open(mta.config_path, "w") as f:
            f.write(text.replace(f"smtp_port = {smtp_port}\n", f'smtp_port = {smtp_port}\ntls_ca_file = "{ca.cert_path}"\n', 1))
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.ehlo("client.test")
            assert "requiretls" not in client.esmtp_features
            assert client.mail("s@example.org", ["REQUIRETLS"])[0] == 530
            client.rset()
            context = ssl.create_default_context(cafile=ca.cert_path)
            context.check_hostname = False  # the certificate names mx.example.test; we dial 127.0.0.1
            client.starttls(context=context)
            client.ehlo("client.test")
            assert "requiretls" in client.esmtp_features
            client.sendmail("s@example.org", ["r@rt.test"], "Subject: secret\r\n\r\nbody\r\n", mail_options=["REQUIRETLS"])
        mta.wait_for(lambda: mta.queue_files("deferred"), what="deferral: the hop offers no REQUIRETLS")
        [qid] = mta.queue_files("deferred")
        reply = json.loads(queue_cli(mta, "show", qid).stdout)["recipients"][0]["reply"]
        assert (reply["enhanced"], reply["tls_policy"]) == ("4.7.30", "requiretls")
        assert old.messages == []
        assert old.mail_lines == []
        old.stop()
        new = Receiver("127.0.0.2", smtp_port, mx_cert, requiretls=True)
        try:
            assert queue_cli(mta, "flush").returncode == 0
            [(tls, data)] = mta.wait_for(lambda: new.messages, what="delivery to a REQUIRETLS hop")
            assert tls
            assert b"Subject: secret" in data
            assert new.mail_lines[0].endswith(b" REQUIRETLS")
        finally:
            new.stop()
    finally:
        mta.stop()
        old.stop()
        dns.stop()
