"""Every classification rule in rules.toml with the failures it is for: minimal diagnostic texts
written here in the wordings mail systems use (after Sisimai's reason taxonomy), each decided
through the whole rule order, so a new or reordered rule that steals another's case fails."""

from __future__ import annotations

import tomllib

import pytest

from pymta.feedback.classify import RULES_PATH, classify

# reason -> [(Status, Diagnostic-Code text, SMTP command or None)]
CASES: dict[str, list[tuple[str | None, str, str | None]]] = {
    "mailboxfull": [("5.2.2", "552 5.2.2 <a@b.test>... Mailbox Full", "RCPT"),
                    ("5.1.1", "552 5.2.2 user is over quota", None),  # the diagnostic's own code wins
                    (None, "Remote host said: 552 Error: disk quota exceeded", None)],
    "mesgtoobig": [("5.3.4", "552 5.3.4 Error: message file too big", "DATA"),
                   (None, "552 Message size exceeds fixed maximum message size (10485760)", "MAIL")],
    "exceedlimit": [("5.2.3", "552 5.2.3 Message length exceeds administrative limit", "RCPT")],
    "suspend": [("5.0.0", "550 5.0.0 Recipient suspend the service", None),
                ("5.7.1", "550 5.7.1 User a@b.test temporary locked. Please try again later!", "RCPT")],
    "hasmoved": [("5.1.6", "550 5.1.6 recipient no longer on server: a@b.test", "RCPT")],
    "norelaying": [("5.7.1", "554 5.7.1 <a@b.test>: Relay access denied", "RCPT"),
                   ("5.0.0", "550 Insecure Mail Relay", "MAIL")],
    "authfailure": [("5.7.26", "550 5.7.26 This message does not pass authentication checks", "DATA"),
                    ("5.7.1", "550 5.7.1 Email rejected per DMARC policy for b.test", "DATA"),
                    ("5.0.0", "550 SPF check: fail, sender not authorized", "MAIL")],
    "userunknown": [("5.1.1", "550 5.1.1 <a@b.test>: Recipient address rejected: User unknown", "RCPT"),
                    ("5.0.0", "550 Unknown user a@b.test", "RCPT"),
                    (None, "User some.name (a@b.test) not listed in Domino Directory", None),
                    (None, "The recipient name is not recognized", None),
                    ("5.1.10", "556 5.1.10 Recipient address has null MX", "RCPT")],
    "filtered": [("5.0.0", "550 Unknown user a@b.test", "DATA"),  # "user unknown" after DATA: a content filter
                 ("5.2.1", "550 5.2.1 <a@b.test>... User Unknown", None),
                 ("5.1.1", "550 5.1.1 RCP-P2 Refused due to recipient preferences", "RCPT"),
                 ("5.0.0", "550 : User unknown", None)],
    "requireptr": [("5.7.1", "550 5.7.1 Client host rejected: cannot find your hostname", "RCPT"),
                   ("4.7.25", "450 4.7.25 Client host rejected: cannot find your hostname", "CONN")],
    "notcompliantrfc": [("5.7.1", "550 5.7.1 This message is not RFC 5322 compliant. There are multiple Subject "
                                  "headers.", "DATA")],
    "badreputation": [("5.7.1", "550 5.7.1 Our system has detected that this message is likely suspicious due to "
                                "the very low reputation of the sending IP address", "DATA")],
    "rejected": [("5.1.8", "553 5.1.8 <s@sender.test>... Domain of sender address does not exist", "MAIL"),
                 ("5.0.0", "550 Unroutable sender address", "MAIL"),
                 (None, "Connected to 192.0.2.1 but sender was rejected.", None)],
    "hostunknown": [("5.1.2", "550 5.1.2 Host or domain name not found", None),
                    ("5.0.0", "550 Host unknown", None)],
    "spamdetected": [("5.7.1", "550 5.7.1 Message content rejected, identified as spam", "DATA"),
                     ("5.7.0", "554 5.7.0 Reject, id=12345 - SPAM", "DATA")],
    "speeding": [("4.7.1", "451 4.7.1 <mx.b.test>: Client host rejected: Please try again slower", "RCPT")],
    "toomanyconn": [("4.3.2", "452 4.3.2 Connection rate limit exceeded", "MAIL"),
                    ("4.7.0", "421 4.7.0 Too many concurrent SMTP connections", "CONN")],
    "blocked": [("5.7.1", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
                 "RCPT"),
                ("5.7.0", "550 5.7.0 <s@sender.test>... Please use the smtp server of your ISP.", "MAIL")],
    "virusdetected": [("5.7.0", "550 5.7.0 Message rejected: virus detected (Eicar-Test-Signature)", "DATA")],
    "policyviolation": [("5.7.9", "554 5.7.9 Message not accepted for policy reasons", "DATA")],
    "securityerror": [("5.7.0", "530 5.7.0 Must issue a STARTTLS command first", "MAIL"),
                      ("5.0.0", "550 Please turn on SMTP Authentication in your mail client", None)],
    "systemerror": [("5.3.5", "553 5.3.5 system config error", None),
                    ("4.4.3", "Unable to contact LDAP server. (#4.4.3)", None)],
    "networkerror": [("5.4.6", "554 5.4.6 Hop count exceeded - possible mail loop", "DATA"),
                     ("4.4.4", "Name service error for name=b.test type=MX: Malformed or unexpected name server reply",
                      None),
                     ("5.4.4", "Host not found, try again", None)],  # a DNS hiccup is no dead domain
    "contenterror": [("5.6.0", "550 5.6.0 improper use of 8-bit data in message header", "DATA")],
    "systemfull": [("4.3.1", "452 4.3.1 Insufficient system storage", "MAIL")],
    "notaccept": [("5.3.2", "521 5.3.2 System not accepting network messages", None),
                  (None, "No mx record found for domain=b.test", None)],
    "expired": [("4.4.7", "Delivery time expired", None),
                (None, "retry timeout exceeded: all hosts have been failing for a long time", None),
                (None, "Message expired after sitting in queue for 5 days", None)],
    "mailererror": [("5.3.0", "X-Unix; 255", None), (None, "procmail: Program failure (exit code 1)", None)],
    "syntaxerror": [("5.5.2", "500 5.5.2 Syntax error, command unrecognized", None),
                    ("5.0.0", "504 Command parameter not implemented", None)],
}  # fmt: skip


def test_every_rule_has_cases():
    with open(RULES_PATH, "rb") as f:
        reasons = set(tomllib.load(f)["patterns"])
    assert reasons <= set(CASES), f"rules without cases: {sorted(reasons - set(CASES))}"


@pytest.mark.parametrize(
    ("reason", "status", "text", "command"),
    [(reason, *case) for reason, cases in CASES.items() for case in cases],
    ids=[f"{reason}-{i}" for reason, cases in CASES.items() for i in range(len(cases))],
)
def test_rule_decides_its_cases(reason, status, text, command):
    assert classify(status, text, None, command=command)[0] == reason


@pytest.mark.parametrize(
    ("reason", "hard"),
    [("userunknown", True), ("hostunknown", True), ("hasmoved", True), ("filtered", False), ("mailboxfull", False),
     ("blocked", False), ("expired", False), ("networkerror", False)],
)
def test_hard_and_soft(reason, hard):
    status, text, command = CASES[reason][0]
    assert classify(status, text, None, command=command)[1] is hard


@pytest.mark.parametrize(
    ("status", "text", "reason"),
    [
        ("5.1.1", "552 5.2.2 over quota", "mailboxfull"),  # the more specific diagnostic wins
        ("5.1.1", "550 5.7.1 IP 192.0.2.1 blacklisted", "blocked"),
        (None, "Host or domain name not found. Name service error for name=b.test type=A: Host not found",
         "hostunknown"),
        ("5.2.3", "552 5.2.3 message too big for this recipient", "exceedlimit"),
        ("5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", "userunknown"),
        ("4.7.0", "421 4.7.0 rate limit exceeded, try again later", "toomanyconn"),
        (None, "retry timeout exceeded: all hosts have been failing for a long time", "expired"),
        (None, "delivery aborted after 5 hours", "expired"),
        (None, "host mx.b.test is not responding", "expired"),
        ("5.0.0", "451 Service currently unavailable", "systemerror"),
        ("5.0.0", "554 Transaction failed ", "systemerror"),
        ("5.7.1", "550 5.7.1 SPF: sender not authorized (PRA check failed)", "authfailure"),
    ],
)
def test_reasons_the_issue_names(status, text, reason):
    assert classify(status, text, None)[0] == reason


def test_dsn_field_names_in_a_window_never_look_like_rfc_violations():
    text = ("Final-Recipient: rfc822; a@b.test Original-Recipient: rfc822;a@b.test Action: failed "
            "Content-Transfer-Encoding: 8bit 550 5.0.0 mailbox unavailable")  # fmt: skip
    assert classify("5.0.0", text, 550)[0] != "notcompliantrfc"
