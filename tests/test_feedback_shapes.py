"""Bounces in the shapes mail systems really send (messages written here, not taken from any
corpus): the report's own text decides, broken MIME still parses, line endings do not matter,
and what is not a bounce is never taken for one."""

from __future__ import annotations

import pytest

from pymta.feedback.parse import parse_message

HEAD = "From: MAILER-DAEMON@mx.remote.test\nTo: news@sender.test\nSubject: Undelivered Mail Returned to Sender\n"

# a plain-text bounce whose returned message names other people and carries scary words
RETURNED_HEADERS = (
    HEAD + "\nThe following address failed:\n\n  <carol@remote.test>: 552 5.2.2 mailbox is full\n\n"
    "------ This is a copy of the message, including all the headers. ------\n"
    "Received: from mx.sender.test by mx.remote.test for <dave@remote.test>; Mon, 1 Jan 2024 00:00:00 +0000\n"
    "DKIM-Signature: v=1; d=sender.test; spf=fail user unknown blacklisted\n"
    "Content-Type: text/plain\nFrom: news@sender.test\nTo: carol@remote.test, erin@remote.test\n"
    "Subject: user unknown relay denied\n\nhello\n"
)


def test_reason_and_recipients_come_from_the_report_not_the_returned_message():
    report = parse_message(RETURNED_HEADERS.encode())
    assert report.recipients == ["carol@remote.test"]
    assert (report.reason, report.hard, report.status) == ("mailboxfull", False, "5.2.2")


def dsn(blocks: str, boundary_line: str = "--B", declared: str = "B") -> bytes:
    return (
        HEAD + f'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="{declared}"\n\n'
        f"{boundary_line}\nContent-Type: text/plain\n\nsorry\n\n"
        f"{boundary_line}\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.remote.test\n\n"
        f"{blocks}\n{boundary_line}--\n"
    ).encode()


TWO_BLOCKS = (
    "Final-Recipient: rfc822; carol@remote.test\nAction: failed\nStatus: 5.1.1\n"
    "Diagnostic-Code: smtp; 550 5.1.1 user unknown (in reply to RCPT TO command)\n\n"
    "Final-Recipient: rfc822; dave@remote.test\nAction: failed\nStatus: 5.2.2\n"
    "Diagnostic-Code: smtp; 552 5.2.2 mailbox full\n"
)


@pytest.mark.parametrize(
    ("boundary_line", "declared"),
    [("--B", "B"), ("--B", "WRONG"), ("  --B", "B"), ("", "B")],
    ids=["intact", "wrong boundary", "indented boundary", "no boundary lines"],
)
def test_broken_mime_still_yields_the_delivery_status_fields(boundary_line, declared):
    report = parse_message(dsn(TWO_BLOCKS, boundary_line, declared))
    assert report.recipients == ["carol@remote.test", "dave@remote.test"]
    assert {d.address: d.reason for d in report.details} == {"carol@remote.test": "userunknown",
                                                               "dave@remote.test": "mailboxfull"}  # fmt: skip


def test_recipient_blocks_without_blank_lines_between_them_each_count():
    report = parse_message(dsn(TWO_BLOCKS.replace("\n\n", "\n")))
    assert report.recipients == ["carol@remote.test", "dave@remote.test"]
    assert [d.status for d in report.details] == ["5.1.1", "5.2.2"]


def test_repeated_original_rcpt_to_in_a_complaint_gives_every_recipient():
    raw = (
        b"From: fbl@isp.test\nSubject: report\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\n\n--A\nContent-Type: text/plain\n\nx\n'
        b"--A\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nVersion: 1\n"
        b"Original-Rcpt-To: <grace@isp.test>\nOriginal-Rcpt-To: <heidi@isp.test>\n--A--\n"
    )
    assert parse_message(raw).recipients == ["grace@isp.test", "heidi@isp.test"]


def test_non_addresses_never_become_recipients():
    raw = (
        HEAD + "\nThe following address failed:\n\n"
        "  <frank@remote.test>:\n    Remote host said: 550 5.1.1 unknown user\n"
        "    Transcript: MAIL FROM:<news@sender.test> SIZE=100\n"
        "    delivery to /var/mail/frank@localhost.test failed\n"
        "    postmaster @remote.test and '@bare.remote.test'\n"
    ).encode()
    assert parse_message(raw).recipients == ["frank@remote.test"]


def test_a_report_without_recipient_block_falls_back_to_a_single_returned_to():
    single = (
        HEAD + 'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nYour message could not be delivered.\n"
        "--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.remote.test\nStatus: 5.1.1\n"
        "--B\nContent-Type: text/rfc822-headers\n\nFrom: news@sender.test\nTo: {to}\nSubject: hi\n--B--\n"
    )
    report = parse_message(single.format(to="ivan@remote.test").encode())
    assert (report.recipients, report.action, report.status) == (["ivan@remote.test"], "failed", "5.1.1")
    two = parse_message(single.format(to="ivan@remote.test, judy@remote.test").encode())
    assert two.recipients == []  # which of two failed would be a guess


SAMPLES = [
    dsn(TWO_BLOCKS),
    RETURNED_HEADERS.encode(),
    (HEAD + "X-Failed-Recipients: kim@remote.test\n\nkim@remote.test\n  550 5.7.1 blocked using zen.spamhaus.org\n").encode(),
]


@pytest.mark.parametrize("raw", SAMPLES)
def test_cr_only_and_crlf_line_endings_parse_as_lf(raw):
    want = parse_message(raw)
    for ending in (b"\r\n", b"\r"):
        got = parse_message(raw.replace(b"\n", ending))
        assert (got.kind, got.recipients, got.action, got.reason, got.hard, got.status) == (
            want.kind, want.recipients, want.action, want.reason, want.hard, want.status)  # fmt: skip


def test_challenge_response_messages_are_never_failures():
    raw = (
        b"From: Challenge Service <noreply@challenge.remote.test>\nTo: news@sender.test\n"
        b"Subject: Undeliverable: please verify your message\n\n"
        b"Your message to laura@remote.test is waiting. Laura only accepts mail from approved senders.\n"
        b"Please click the following link to confirm and deliver your message.\n"
    )
    report = parse_message(raw)
    assert (report.kind, report.action) == ("autoreply", "autoreply")
    assert all(d.action != "failed" for d in report.details)


def test_a_delay_warning_is_never_a_failure():
    raw = dsn(
        "Final-Recipient: rfc822; mike@remote.test\nAction: delayed\nStatus: 4.4.1\n"
        "Diagnostic-Code: smtp; 451 4.4.1 no answer from host\nWill-Retry-Until: Tue, 2 Jan 2024 00:00:00 +0000\n"
    )
    report = parse_message(raw)
    assert (report.action, report.hard) == ("delayed", False)


def test_a_bounce_marked_auto_replied_is_still_a_bounce():
    raw = (HEAD + "Auto-Submitted: auto-replied\n\nThe following address failed:\n\n"
           "  nina@remote.test\n    550 5.1.1 user unknown (in reply to RCPT TO command)\n").encode()  # fmt: skip
    report = parse_message(raw)
    assert (report.kind, report.action, report.recipients, report.reason) == (
        "dsn", "failed", ["nina@remote.test"], "userunknown")  # fmt: skip


@pytest.mark.parametrize(
    "subject",
    [
        "=?utf-8?q?Automatische_Antwort=3A_hello?=",
        "=?iso-8859-1?q?R=E9ponse_automatique_=3A_hello?=",
        "=?utf-8?b?6Ieq5YuV5b+c562UOiBoZWxsbw==?=",  # 自動応答: hello
        "=?koi8-r?b?4dfUz83B1MnexdPLycog z9TXxdQ=?=",  # Автоматический ответ
    ],
)
def test_auto_replies_with_encoded_subjects_in_other_languages(subject):
    raw = f"From: oscar@remote.test\nTo: news@sender.test\nSubject: {subject}\n\nI am out.\n".encode()
    report = parse_message(raw)
    assert (report.kind, report.action, report.recipients) == ("autoreply", "autoreply", ["oscar@remote.test"])
