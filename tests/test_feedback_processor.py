"""Feedback arriving at the bounce domain and feedback addresses feeds suppression, and only when
signed."""

from __future__ import annotations

import pytest
from twisted.internet import task

from pymta.envelope import Envelope, Recipient, new_qid
from pymta.feedback.parse import parse_message
from pymta.feedback.processor import FeedbackProcessor
from pymta.feedback.suppression import SuppressionStore
from pymta.feedback.verp import TRACE_HEADER, Tagger
from tests.fakes import ScriptedDeliveryAgent

SECRET = "feedback-secret-0123456789"


def dsn(to: str, rcpt: str, status: str = "5.1.1", action: str = "failed", diagnostic: str = "user unknown") -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.remote.test\r\nTo: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
        "--B\r\nContent-Type: text/plain\r\n\r\nsorry\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} {diagnostic}\r\n--B--\r\n"
    ).encode()


def arf(trace: str | None) -> bytes:
    header = f"{TRACE_HEADER}: {trace}\r\n" if trace else ""
    return (
        "From: fbl@isp.test\r\nTo: fbl@sender.test\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=feedback-report; boundary=\"A\"\r\n\r\n"
        "--A\r\nContent-Type: text/plain\r\n\r\nabuse report\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nVersion: 1\r\n"
        "--A\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: news@sender.test\r\nTo: [redacted]\r\n"
        f"{header}Subject: hi\r\n--A--\r\n"
    ).encode()


@pytest.fixture
def world(tmp_path):
    clock = task.Clock()
    store = SuppressionStore(str(tmp_path / "s.sqlite"), clock)
    tagger = Tagger(SECRET, "bounces.sender.test")
    processor = FeedbackProcessor(store, tagger, complaint_addresses=("fbl@sender.test",))
    yield store, tagger, processor
    store.close()


def handle(processor, to: str, raw: bytes, sender: str = "") -> str:
    return processor.handle(to, Envelope(qid=new_qid(), sender=sender, recipients=[]), parse_message(raw))


def test_signed_hard_bounce_suppresses_the_recipient(world):
    store, tagger, processor = world
    qid = new_qid()
    return_path = tagger.return_path(qid, "carol@remote.test")
    outcome = handle(processor, return_path, dsn(return_path, "carol@remote.test"))
    assert "carol@remote.test hard userunknown" in outcome
    assert store.is_suppressed("carol@remote.test")["source"] == "bounce"


def test_backscatter_and_replayed_tokens_suppress_nobody(world):
    store, tagger, processor = world
    genuine = tagger.return_path(new_qid(), "carol@remote.test")
    # A bounce that names someone else than the token was made for.
    assert handle(processor, genuine, dsn(genuine, "dave@remote.test")).startswith("ignored")
    forged = Tagger("another-secret-0123456789", "bounces.sender.test").return_path(new_qid(), "erin@remote.test")
    assert handle(processor, forged, dsn(forged, "erin@remote.test")).startswith("ignored")
    assert store.is_suppressed("dave@remote.test") is None
    assert store.is_suppressed("erin@remote.test") is None


def test_soft_bounce_counts_but_does_not_suppress_at_once(world):
    store, tagger, processor = world
    rp = tagger.return_path(new_qid(), "frank@remote.test")
    outcome = handle(processor, rp, dsn(rp, "frank@remote.test", "5.2.2"))
    assert "soft mailboxfull" in outcome
    assert store.is_suppressed("frank@remote.test") is None


def test_a_hard_reason_without_a_permanent_status_only_counts_as_soft(world):
    store, tagger, processor = world
    rp = tagger.return_path(new_qid(), "ivan@remote.test")
    outcome = handle(processor, rp, dsn(rp, "ivan@remote.test", "4.1.1"))
    assert "ivan@remote.test soft userunknown" in outcome
    assert store.is_suppressed("ivan@remote.test") is None


def test_an_undecided_reason_suppresses_nobody_however_often(world):
    store, tagger, processor = world
    for _ in range(store.policy.soft_threshold + 1):
        rp = tagger.return_path(new_qid(), "judy@remote.test")
        outcome = handle(processor, rp, dsn(rp, "judy@remote.test", "5.0.0", diagnostic="something nobody has seen"))
        assert "judy@remote.test undecided onhold: not counted" in outcome
    assert store.is_suppressed("judy@remote.test") is None


def test_soft_reasons_reach_the_threshold(world):
    store, tagger, processor = world
    for _ in range(store.policy.soft_threshold):
        rp = tagger.return_path(new_qid(), "kim@remote.test")
        handle(processor, rp, dsn(rp, "kim@remote.test", "4.2.2", diagnostic="mailbox full"))
    assert store.is_suppressed("kim@remote.test")["source"] == "bounce"


def test_complaint_with_a_genuine_trace_header_suppresses(world):
    store, tagger, processor = world
    qid = new_qid()
    outcome = handle(processor, "fbl@sender.test", arf(tagger.trace_value(qid, "grace@isp.test")))
    assert outcome == f"complaint about {qid} for grace@isp.test: suppressed"
    assert store.is_suppressed("grace@isp.test")["source"] == "complaint"
    assert handle(processor, "fbl@sender.test", arf(None)).startswith("ignored")
    assert handle(processor, "fbl@sender.test", arf("0123456789ABCDEFGH.abc.abcdefghijklmnop")).startswith("ignored")


def test_one_click_unsubscribe_from_the_recipient(world):
    store, tagger, processor = world
    address = tagger.unsubscribe_address(new_qid(), "heidi@remote.test", "news.sender.test")
    raw = b"From: heidi@remote.test\r\nTo: x\r\nSubject: unsubscribe\r\n\r\n"
    outcome = handle(processor, address, raw, sender="heidi@remote.test")
    assert outcome == "unsubscribed heidi@remote.test from news.sender.test"
    assert store.is_suppressed("heidi@remote.test") is None
    assert store.is_suppressed("heidi@remote.test", "news.sender.test")["source"] == "unsubscribe"
    other = b"From: mallory@evil.test\r\nTo: x\r\nSubject: unsubscribe\r\n\r\n"
    assert handle(processor, address, other, sender="mallory@evil.test").startswith("ignored")


def test_human_replies_are_kept_in_the_reply_mailbox_and_auto_replies_are_not(world):
    store, tagger, _ = world
    mailbox = ScriptedDeliveryAgent()
    processor = FeedbackProcessor(store, tagger, reply_addresses=("replies@sender.test",), reply_agent=mailbox,
                                  reply_mailbox="inbox@sender.test")  # fmt: skip
    human = b"From: judy@remote.test\r\nTo: replies@sender.test\r\nSubject: Re: hi\r\n\r\nthanks\r\n"
    auto = b"From: ivan@remote.test\r\nTo: replies@sender.test\r\nSubject: Out of Office\r\nAuto-Submitted: auto-replied\r\n\r\naway\r\n"
    results = []
    envelope = Envelope(qid=new_qid(), sender="judy@remote.test", recipients=[])
    processor.deliver(envelope, [Recipient("replies@sender.test", route="feedback")], human).addCallback(results.extend)
    processor.deliver(envelope, [Recipient("replies@sender.test", route="feedback")], auto).addCallback(results.extend)
    assert [(addresses, body) for _, addresses, body in mailbox.calls] == [(["inbox@sender.test"], human)]
    assert results[0].text.startswith("reply kept in inbox@sender.test")
    assert "auto-reply" in results[1].text


def test_a_complaint_whose_dkim_signature_fails_suppresses_nobody(tmp_path):
    store = SuppressionStore(str(tmp_path / "s.sqlite"), task.Clock())
    tagger = Tagger(SECRET, "bounces.sender.test")
    processor = FeedbackProcessor(store, tagger, complaint_addresses=("fbl@sender.test",), authserv_id="mx.sender.test")
    qid = new_qid()
    report = arf(tagger.trace_value(qid, "grace@isp.test"))
    envelope = Envelope(qid=qid, sender="fbl@isp.test", recipients=[])
    failed = b"Authentication-Results: mx.sender.test; spf=pass smtp.mailfrom=isp.test;\r\n\tdkim=fail header.d=isp.test\r\n"
    results = processor.deliver(envelope, [Recipient("fbl@sender.test", route="feedback")], failed + report).result
    assert "DKIM signature fails" in results[0].text
    assert store.is_suppressed("grace@isp.test") is None
    # the same report with our dkim=pass suppresses
    passed = failed.replace(b"dkim=fail", b"dkim=pass")
    processor.deliver(envelope, [Recipient("fbl@sender.test", route="feedback")], passed + report)
    assert store.is_suppressed("grace@isp.test")["source"] == "complaint"
    store.close()
