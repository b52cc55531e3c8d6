"""End to end: twistd as an MX with sender verdicts on: Authentication-Results in the mailbox,
an ARC set on forwarded mail (checked by Perl's Mail::DKIM ARC verifier), DMARC p=reject refused,
and an ACL on a verdict."""

from __future__ import annotations

import os
import smtplib
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pymta.auth.dkim import SigningKey, sign_message
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port
from tests.test_dkim import needs_perl, txt, verify
from tests.test_e2e_relay import Sink

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed"),
]

SENDER_KEY = rsa.generate_private_key(65537, 2048)
FORWARD_KEY = rsa.generate_private_key(65537, 2048)


def signing_key(domain: str, selector: str, private) -> SigningKey:
    return SigningKey(domain, selector, "rsa-sha256", private, "-", headers=("from", "to", "subject"), oversign=("from",))


def message(from_addr: str, to: str, subject: str = "hi") -> bytes:
    return f"From: {from_addr}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n.dot line\r\nHello.\r\nbody\r\n".encode()


def signed(msg: bytes) -> bytes:
    return sign_message(msg, signing_key("example.org", "s1", SENDER_KEY), int(time.time())) + msg


@pytest.fixture
def world(tmp_path):
    zone = Zone({
        "example.org": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']},
        "s1._domainkey.example.org": {"TXT": [txt(signing_key("example.org", "s1", SENDER_KEY).public_record())]},
        "_dmarc.example.org": {"TXT": ['"v=DMARC1; p=reject"']},
        "other.example": {"TXT": ['"v=spf1 -all"']},
        "arc._domainkey.forward.example": {"TXT": [txt(signing_key("forward.example", "arc", FORWARD_KEY).public_record())]},
    })  # fmt: skip
    dns = DNSServer(zone).start()
    port = free_port("127.0.0.7")
    sink = Sink("127.0.0.7", port)
    key_path = tmp_path / "forward.pem"
    key_path.write_bytes(FORWARD_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))  # fmt: skip
    mta = MTAProcess(str(tmp_path), dns=dns.address, relay_from="10.9.9.0/24", extra_config=f"""
        [routes]
        "forward.example" = "127.0.0.7:{port}"
        [auth]
        authserv_id = "mx.example.test"
        dmarc_reject = true
        [dkim."forward.example"]
        selector = "arc"
        key = "{key_path}"
        [[acl.data]]
        dkim = ["fail", "permerror"]
        action = "reject"
        reply = "550 5.7.20 DKIM signature does not verify"
    """)
    with open(mta.config_path) as f:
        text = f.read()
    with open(mta.config_path, "w") as f:
        f.write(text.replace("[domains]\n", '[domains]\nforward = ["forward.example"]\n', 1))
    mta.start()
    yield mta, dns, sink
    mta.stop()
    sink.stop()
    dns.stop()


def send(mta: MTAProcess, sender: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.sendmail(sender, [rcpt], data)


@needs_perl
def test_verdicts_reach_the_mailbox_and_forwarded_mail_is_arc_sealed(world):
    mta, dns, sink = world
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.example\r\n"
    send(mta, "bob@example.org", "alice@example.test", forged + signed(message("bob@example.org", "alice@example.test")))
    [stored] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="delivery")
    head = stored.split(b"\n\n", 1)[0].replace(b"\n\t", b" ")
    results = [line for line in head.split(b"\n") if line.startswith(b"Authentication-Results:")]
    assert len(results) == 1
    assert b"bank.example" not in results[0]
    assert b"spf=pass smtp.mailfrom=bob@example.org" in results[0]
    assert b"dkim=pass header.d=example.org" in results[0]
    assert b"dmarc=pass" in results[0]

    send(mta, "bob@example.org", "carol@forward.example", signed(message("bob@example.org", "carol@forward.example")))
    [forwarded] = mta.wait_for(sink.messages, what="forwarded message")  # whole files: they end in "body"
    body = forwarded[forwarded.find(b"ARC-Seal:") :] if b"ARC-Seal:" in forwarded else forwarded
    seal = body.split(b"\n", 1)[0]
    assert seal.startswith(b"ARC-Seal: i=1;")
    assert b" cv=none;" in seal
    assert b" d=forward.example; s=arc;" in seal
    assert verify(body, dns.port) == ["pass example.org rsa-sha256 pass", "overall pass"]  # the sender's DKIM still holds
    assert verify(body, dns.port, "arc")[0].startswith("arc pass")
    tampered = body.replace(b"Hello.", b"Hell0.")
    assert verify(tampered, dns.port, "arc")[0].startswith("arc fail")


def test_dmarc_reject_and_a_verdict_acl_refuse_at_end_of_data(world):
    mta, _, _ = world
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(mta, "x@other.example", "alice@example.test", message("ceo@example.org", "alice@example.test"))
    assert e.value.smtp_code == 550
    assert e.value.smtp_error.startswith(b"5.7.1 ")
    broken = signed(message("bob@example.org", "alice@example.test")).replace(b"Hello.", b"Hell0.")
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(mta, "bob@example.org", "alice@example.test", broken)
    assert (e.value.smtp_code, e.value.smtp_error) == (550, b"5.7.20 DKIM signature does not verify")
    assert mta.maildir_messages("alice@example.test") == []
