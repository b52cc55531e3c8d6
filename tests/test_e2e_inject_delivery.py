"""A 1,000-recipient injection through the real ``twistd pymta``, delivered to an SMTP receiver on
loopback: every recipient gets exactly one message with its own variables, its own one-click
unsubscribe and tracking tokens, and DKIM signatures that verify."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
import socket
import textwrap
import urllib.request

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pymta.admin.http.tokens import digest
from pymta.events.tracking import CLICK, OPEN, TrackingTokens
from pymta.feedback.verp import Tagger
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port, http_service_config, wait_for_port, wait_until
from tests.smtp_receiver import ScriptedReceiver

pytestmark = pytest.mark.timeout(900)

TOKEN = "inject-token-0123456789abcdefghijklmno"
SECRET = "delivery-feedback-secret-0123456789"
N = 1000


class CollectingReceiver(ScriptedReceiver):
    """Accepts every transaction and keeps (recipients, message) of each."""

    accept_for = 800.0
    session_for = 700.0

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []
        super().__init__()

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        with self.lock:
            self.messages.append((recipients, message))
        return b"250 accepted"

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


def test_a_thousand_personalised_recipients_each_get_their_own_signed_tracked_message(tmp_path):
    key = rsa.generate_private_key(65537, 2048)
    key_path = tmp_path / "shop.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    dkim_record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    tokens = tmp_path / "api-tokens"
    tokens.write_text(f"crm:inject:{digest(TOKEN)}\n")
    receiver = CollectingReceiver()
    dns = DNSServer(Zone({"remote.example": {"MX": ["10 mx.remote.example."]},
                          "mx.remote.example": {"A": ["127.0.0.1"]}})).start()  # fmt: skip
    api_port, public_port = free_port(), free_port()
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=receiver.port, extra_config=http_service_config(SECRET, api_port, public_port, tokens) + textwrap.dedent(f"""
        max_body = 4000000
        [dkim."shop.example"]
        selector = "s1"
        key = "{key_path}"
        [tracking]
        enabled = true
        """))  # fmt: skip
    try:
        mta.start()
        wait_for_port("127.0.0.1", api_port, 30)
        recipients = [{"email": f"user{i}@remote.example", "name": f"User {i}",
                       "substitutions": {"first": f"First{i}", "code": f"C{i * 7:05d}"}} for i in range(N)]  # fmt: skip
        body = json.dumps({
            "envelope_sender": "news@shop.example", "recipients": recipients, "campaign": "dec",
            "substitutions": {"season": "winter"},
            "content": {"from": {"email": "news@shop.example", "name": "Shop"}, "subject": "{{ first }}: {{ season }}",
                        "text_body": "Dear {{ first }}, your code is {{ code }}.\n",
                        "html_body": '<html><body><p>Dear {{ first }}</p>'
                                     '<a href="https://shop.example/c/{{ code }}">code</a></body></html>'},
        }).encode()  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/v1/inject", body, method="POST", headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=600) as resp:
            answer = json.loads(resp.read())
        assert answer["success_count"] == N, str(answer)[:500]
        assert answer["fail_count"] == 0, str(answer)[:500]
        qid_of = {f"user{i}@remote.example": qid for i, qid in enumerate(answer["queue_ids"])}
        wait_until(lambda: receiver.count() >= N, 700, f"{N} deliveries")
    finally:
        mta.stop()
        receiver.stop()
        dns.stop()

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return dkim_record if name == b"s1._domainkey.shop.example." else None

    tagger = Tagger(SECRET, "bounces.example.test")
    tracking = TrackingTokens(SECRET)
    seen: set[str] = set()
    for rcpts, raw in receiver.messages:
        [rcpt] = rcpts
        assert rcpt not in seen, f"{rcpt} got two messages"
        seen.add(rcpt)
        i = int(re.fullmatch(r"user(\d+)@remote\.example", rcpt).group(1))
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert str(msg["Subject"]) == f"First{i}: winter"
        assert msg["To"].addresses[0].display_name == f"User {i}"
        assert msg.get_body(("plain",)).get_content().strip() == f"Dear First{i}, your code is C{i * 7:05d}."
        html = msg.get_body(("html",)).get_content()
        assert f"<p>Dear First{i}</p>" in html
        assert "https://shop.example/c/" not in html
        [click] = re.findall(r'href="https://mail\.example\.test/t/c/([^"]+)"', html)
        assert tracking.parse(CLICK, click) == (qid_of[rcpt], rcpt, f"https://shop.example/c/C{i * 7:05d}")
        [pixel] = re.findall(r'src="https://mail\.example\.test/t/o/([^"]+)\.gif"', html)
        assert tracking.parse(OPEN, pixel)[:2] == (qid_of[rcpt], rcpt)
        [one_click] = re.findall(r"<https://mail\.example\.test/u/([^>]+)>", str(msg["List-Unsubscribe"]))
        assert tagger.parse_unsubscribe_token(one_click) == (qid_of[rcpt], rcpt, "shop.example")
        # Signed at injection (after the tracking rewrite), and again at delivery over the
        # List-Unsubscribe fields added then: both signatures verify.
        assert raw.count(b"DKIM-Signature:") == 2
        signed = dkim.DKIM(raw)
        assert all(signed.verify(idx=k, dnsfunc=lookup) for k in range(2))
        assert b"list-unsubscribe" in raw.split(b"DKIM-Signature:")[1].split(b"b=")[0].lower()
    assert seen == set(qid_of)
    assert len(seen) == N
