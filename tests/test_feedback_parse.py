"""Parsing what comes back (messages written here, not taken from any corpus) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pymta.feedback.classify import classify, load_rules
from pymta.feedback.parse import parse_message

POSTFIX_DSN = b"""\
From: MAILER-DAEMON@mx.sender.test (Mail Delivery System)
To: news@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; Carol@Remote.Test
Original-Recipient: rfc822;carol@remote.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.remote.test
Diagnostic-Code: smtp; 550 5.1.1 <carol@remote.test>: Recipient address rejected: User unknown

Final-Recipient: rfc822; dave@remote.test
Action: delayed
Status: 4.2.2
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full

--B
Content-Type: text/rfc822-headers

From: news@sender.test
To: carol@remote.test
X-Pymta-Trace: TOKEN
Subject: hello

--B--
"""

EXIM_TEXT = b"""\
From: Mail Delivery System <Mailer-Daemon@mx.remote.test>
To: news@sender.test
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: erin@remote.test
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  erin@remote.test
    host mx.remote.test [192.0.2.1]
    SMTP error from remote mail server after RCPT TO:<erin@remote.test>:
    550 5.2.2 mailbox is full, quota exceeded

------ This is a copy of the message, including all the headers. ------
From: news@sender.test
"""

QMAIL = b"""\
From: MAILER-DAEMON@qmail.remote.test
To: news@sender.test
Subject: failure notice

Hi. This is the qmail-send program at qmail.remote.test.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<frank@remote.test>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.
"""

ARF = b"""\
From: feedback@isp.test
To: fbl@sender.test
Subject: FW: hello
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="A"

--A
Content-Type: text/plain

This is an email abuse report.

--A
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp-fbl/1.0
Version: 1
Original-Rcpt-To: <Grace@isp.test>

--A
Content-Type: message/rfc822

From: news@sender.test
To: grace@isp.test
X-Pymta-Trace: TOKEN
Subject: hello

body
--A--
"""

AUTOREPLY = b"""\
From: Heidi <heidi@remote.test>
To: news@sender.test
Subject: Out of Office: hello
Auto-Submitted: auto-replied

I am away until Monday.
"""

VACATION_BY_SUBJECT = b"""\
From: ivan@remote.test
To: news@sender.test
Subject: Automatic reply: hello

Back next week.
"""

HUMAN = b"""\
From: Judy <judy@remote.test>
To: news@sender.test
Subject: Re: hello
In-Reply-To: <m1@sender.test>

Thanks, sounds good!
"""


def test_standard_dsn_per_recipient():
    report = parse_message(POSTFIX_DSN)
    assert report.kind == "dsn"
    assert report.recipients == ["carol@remote.test", "dave@remote.test"]
    carol, dave = report.details
    assert (carol.action, carol.status, carol.reason, carol.hard) == ("failed", "5.1.1", "userunknown", True)
    assert (dave.action, dave.status, dave.reason, dave.hard) == ("delayed", "4.2.2", "mailboxfull", False)
    assert carol.remote_mta == "dns; mx.remote.test"
    assert report.original_headers["x-pymta-trace"] == "TOKEN"


def test_exim_plain_text_bounce():
    report = parse_message(EXIM_TEXT)
    assert (report.kind, report.recipients, report.action) == ("dsn", ["erin@remote.test"], "failed")
    assert (report.reason, report.hard, report.status) == ("mailboxfull", False, "5.2.2")


def test_qmail_bounce():
    report = parse_message(QMAIL)
    assert report.recipients == ["frank@remote.test"]
    assert (report.reason, report.hard) == ("userunknown", True)


def test_arf_complaint():
    report = parse_message(ARF)
    assert (report.kind, report.action, report.reason, report.feedback_type) == ("arf", "complaint", "feedback", "abuse")
    assert report.recipients == ["grace@isp.test"]
    assert report.original_headers["x-pymta-trace"] == "TOKEN"


@pytest.mark.parametrize(("raw", "who"), [(AUTOREPLY, "heidi@remote.test"), (VACATION_BY_SUBJECT, "ivan@remote.test")])
def test_auto_replies(raw, who):
    report = parse_message(raw)
    assert (report.kind, report.action, report.reason, report.recipients) == ("autoreply", "autoreply", "vacation", [who])


def test_human_reply():
    report = parse_message(HUMAN)
    assert (report.kind, report.action, report.recipients) == ("reply", "reply", [])


@pytest.mark.parametrize("raw", [b"", b"\x00\xff\xfe binary junk \x00", b"Content-Type: multipart/report; boundary=\r\n\r\n--", b"From"])
def test_junk_never_raises(raw):
    report = parse_message(raw)
    assert report.kind in ("unknown", "reply", "dsn")


@pytest.mark.parametrize(
    ("status", "text", "code", "reason", "hard"),
    [
        ("5.1.1", "", 550, "userunknown", True),
        (None, "550 Requested action not taken: mailbox unavailable - user unknown", 550, "filtered", False),
        (None, "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", 554, "blocked", False),
        ("4.7.0", "421 4.7.0 Try again later, closing connection (rate limit)", 421, "toomanyconn", False),
        ("5.1.10", "", 556, "userunknown", True),  # null MX: nobody can receive there
        ("4.4.7", "", 451, "expired", False),
        (None, "552 message size exceeds fixed maximum message size", 552, "mesgtoobig", False),
        (None, "550 5.7.26 Unauthenticated email is not accepted (DMARC)", 550, "authfailure", False),
        (None, "something nobody has ever seen", 450, "onhold", False),
        (None, "", 450, "undefined", False),
        (None, "SMTP error from remote mail server after MAIL FROM:<a@b.test> SIZE=1024: 550 Unroutable sender address",
         550, "rejected", False),
    ],
)
def test_classification_rules(status, text, code, reason, hard):
    assert classify(status, text, code) == (reason, hard)


@pytest.mark.parametrize(
    ("status", "command", "reason", "hard"),
    [
        ("5.0.0", "RCPT", "userunknown", True),
        ("5.0.0", "DATA", "filtered", False),  # a content filter answering with "user unknown"
        ("5.0.0", None, "userunknown", True),
        (None, None, "filtered", False),  # neither code nor command: Sisimai's filtered
        ("5.2.1", None, "filtered", False),
        ("5.1.1", "DATA", "userunknown", True),  # the code says so
    ],
)
def test_user_unknown_is_filtered_after_data(status, command, reason, hard):
    assert classify(status, "550 Unknown user kijitora@example.jp", 550, command=command) == (reason, hard)


def test_rules_file_errors_name_the_rule(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[patterns]\nx = "("\n')
    with pytest.raises(ValueError, match=r"pattern 1 \(x\)"):
        load_rules(str(path))


def test_cli_prints_one_line_per_file_and_a_missing_file_is_one_error_line_and_exit_1(tmp_path):
    files = []
    for name, raw in (("dsn.eml", POSTFIX_DSN), ("arf.eml", ARF), ("junk.eml", b"\x00\x01")):
        (tmp_path / name).write_bytes(raw)
        files.append(str(tmp_path / name))
    files.append(str(tmp_path / "missing.eml"))
    proc = subprocess.run([sys.executable, "-m", "pymta.feedback.cli", "parse", *files],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"pymta-feedback: cannot read {files[3]}: No such file or directory"]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["file"] for x in lines] == files[:3]
    assert lines[0]["kind"] == "dsn"
    assert lines[0]["status"] == "5.1.1"
    assert lines[0]["hard"] is None  # one hard and one soft recipient: no single verdict
    assert lines[1]["action"] == "complaint"
    ok = subprocess.run([sys.executable, "-m", "pymta.feedback.cli", "parse", *files[:3]],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0
    assert ok.stderr == ""
    assert set(lines[0]) == {"file", "kind", "recipients", "action", "hard", "reason", "status"}
