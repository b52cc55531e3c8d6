"""The DSNs we generate, read back with the stdlib email parser."""

from __future__ import annotations

import email

from pymta.envelope import EXPIRED, FAILED, Envelope, Recipient
from pymta.queue.bounce import build_dsn, notify_allows

NOW = 1_700_000_200.0  # the caller's wall clock: build_dsn reads no clock of its own
ORIGINAL = b"From: a@example.org\r\nSubject: original\r\n\r\nline one\nbare lf\rbare cr\r\n"


def envelope(**kw) -> Envelope:
    base = dict(qid="0ABCDEFGHJKLMNPQRS", sender="a@example.org", arrival=1_700_000_000.0, envid="E-1")
    base.update(kw)
    return Envelope(recipients=[], **base)


def failed_rcpt() -> Recipient:
    return Recipient(
        "bob@remote.example", state=FAILED, orcpt="rfc822;Bob@Remote.Example",
        reply={"code": 550, "enhanced": "5.1.1", "text": "user unknown"},
        remote_mta="mx.remote.example [192.0.2.1]", updated=1_700_000_100.0,
    )  # fmt: skip


def parts(raw: bytes) -> dict[str, email.message.Message]:
    msg = email.message_from_bytes(raw)
    return {p.get_content_type(): p for p in msg.walk()}


def test_failure_dsn_has_every_field():
    raw = build_dsn(envelope(ret="FULL"), [failed_rcpt()], "failed", ORIGINAL, "mx.example.test", NOW)
    msg = email.message_from_bytes(raw)
    assert msg["From"].startswith("MAILER-DAEMON@mx.example.test")
    assert msg["To"] == "<a@example.org>"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    p = parts(raw)
    status = p["message/delivery-status"].as_string()
    for field in (
        "Reporting-MTA: dns; mx.example.test", "Original-Envelope-Id: E-1", "Arrival-Date: ",
        "Final-Recipient: rfc822; bob@remote.example", "Original-Recipient: rfc822; Bob@Remote.Example",
        "Action: failed", "Status: 5.1.1", "Remote-MTA: dns; mx.remote.example",
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown", "Last-Attempt-Date: ",
    ):  # fmt: skip
        assert field in status, field
    assert "message/rfc822" in p
    assert b"Subject: original" in raw


def test_the_dsn_dates_are_the_callers_clock_time():
    raw = build_dsn(envelope(arrival=0.0), [failed_rcpt()], "failed", ORIGINAL, "mx.example.test", 86_400.0)
    msg = email.message_from_bytes(raw)
    assert msg["Date"] == "Fri, 02 Jan 1970 00:00:00 -0000"
    assert msg["Message-ID"] == "<0ABCDEFGHJKLMNPQRS.failed.86400@mx.example.test>"
    assert "Arrival-Date: Fri, 02 Jan 1970 00:00:00 -0000" in parts(raw)["message/delivery-status"].as_string()


def test_ret_hdrs_returns_headers_only():
    raw = build_dsn(envelope(ret="HDRS"), [failed_rcpt()], "failed", ORIGINAL, "mx.example.test", NOW)
    assert "text/rfc822-headers" in parts(raw)
    assert b"line one" not in raw


def test_no_bare_cr_or_lf_in_a_dsn():
    raw = build_dsn(envelope(ret="FULL"), [failed_rcpt()], "failed", ORIGINAL, "mx.example.test", NOW)
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.count(b"\r") == raw.count(b"\r\n")


def test_no_dsn_for_a_null_sender_or_when_notify_says_no():
    assert build_dsn(envelope(sender=""), [failed_rcpt()], "failed", ORIGINAL, "h", NOW) is None
    r = failed_rcpt()
    r.notify = ("NEVER",)
    assert build_dsn(envelope(), [r], "failed", ORIGINAL, "h", NOW) is None


def test_expired_recipient_status_defaults_to_447():
    r = Recipient("c@remote.example", state=EXPIRED, reply={"code": 451, "enhanced": "", "text": "expired"})
    raw = build_dsn(envelope(), [r], "failed", ORIGINAL, "h", NOW)
    assert "Status: 4.4.7" in parts(raw)["message/delivery-status"].as_string()


def test_notify_rules():
    r = Recipient("x@y.example")
    assert notify_allows(r, "failed")
    assert notify_allows(r, "delayed")
    assert not notify_allows(r, "delivered")
    r.notify = ("SUCCESS", "DELAY")
    assert notify_allows(r, "relayed")
    assert notify_allows(r, "delayed")
    assert not notify_allows(r, "failed")
