"""The feedback parser is linear and bounded: rules cannot backtrack, addresses are found in one
scan, crafted inputs finish under the test's time limit, and fuzzed messages never raise."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.feedback.classify import RULES_PATH, load_rules, pattern_problem
from pymta.feedback.parse import MAX_MESSAGE_BYTES, Report, iter_addresses, parse_message

HEAD = "From: MAILER-DAEMON@mx.remote.test\nTo: news@sender.test\nSubject: Undelivered Mail Returned to Sender\n"


def dsn(diagnostic: str, recipients: int = 1) -> bytes:
    blocks = "".join(
        f"Final-Recipient: rfc822; user{i}@remote.test\nAction: failed\nStatus: 5.0.0\nDiagnostic-Code: smtp; {diagnostic}\n\n"
        for i in range(recipients)
    )
    return (
        HEAD + 'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nsorry\n--B\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.remote.test\n\n" + blocks + "--B--\n"
    ).encode()


def test_every_shipped_rule_is_free_of_unbounded_and_nested_quantifiers():
    with open(RULES_PATH, "rb") as f:
        rules = tomllib.load(f)["patterns"].values()
    assert len(rules) > 20
    problems = {p[:60]: pattern_problem(p) for p in rules}
    assert {p: why for p, why in problems.items() if why} == {}


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"\bspf\b.*(fail|reject)", "unbounded"),
        (r"(a+)+b", "unbounded"),
        (r"x\d+y", "unbounded"),
        (r"(a{0,50}){0,50}", "multiply"),
        (r"a{0,5000}", "above"),
        (r"(ab)\1", "backreference"),
    ],
)
def test_rule_checker_rejects_backtracking_constructs(pattern, why):
    assert why in (pattern_problem(pattern) or "")


def test_a_rules_file_with_an_unbounded_pattern_is_refused_naming_the_rule(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[patterns]\nok = "fine"\nauthfailure = "dkim.*fail"\n')
    with pytest.raises(ValueError, match=r"pattern 2 \(authfailure\): unbounded"):
        load_rules(str(path))


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("550 <Carol@Remote.Test>: user unknown", ["carol@remote.test"]),
        ("to bob@example.com.", ["bob@example.com"]),
        ("@host.example.com and /var/mail/user@host.example.com", []),
        ("'quoted@example.org' said", ["quoted@example.org"]),
        ("a@b", []),
        ("x" * 70 + "@example.com", []),
        ("one@a.test two@b.test", ["one@a.test", "two@b.test"]),
    ],
)
def test_address_scan_finds_addresses_and_skips_non_addresses(text, found):
    assert [a for _, a in iter_addresses(text)] == found


PATHOLOGICAL = {
    "address characters": HEAD + "\nfailed:\n\n" + "A" * 300_000,
    "address characters around @": HEAD + "\n" + ("b" * 63 + "@") * 5000,
    "spf and dkim diagnostic": dsn("spf dkim " * 100_000).decode(),
    "dashes": HEAD + "\n" + "-" * 300_000,
    "unclosed tags": HEAD + "Content-Type: text/html\n\n" + "<" * 300_000,
    "megabyte subject": HEAD.replace("Subject: ", "Subject: " + "x " * 500_000) + "\nhi\n",
    "deep nesting": HEAD + "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(3000)),
    "many recipients": dsn("550 5.1.1 user unknown", recipients=5000).decode(),
    # found by bench/fuzz_feedback.py: a detector in flufl.bounce is quadratic in the length of a line
    "long line after a failure phrase": HEAD + "\n" + ("recipients. This is a permanent " + "<" * 9000 + "\n") * 20,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_crafted_input_is_parsed_within_the_time_limit(name):
    report = parse_message(PATHOLOGICAL[name].encode())
    assert isinstance(report, Report)
    assert len(report.recipients) <= 1000


def test_only_the_start_of_a_huge_message_is_read():
    raw = dsn("550 5.1.1 user unknown") + b"x" * (MAX_MESSAGE_BYTES * 4)
    assert parse_message(raw).recipients == ["user0@remote.test"]


SEEDS = [
    dsn("550 5.1.1 <user0@remote.test>: Recipient address rejected: User unknown"),
    (HEAD + "X-Failed-Recipients: erin@remote.test\n\nThe following address(es) failed:\n\n  erin@remote.test\n"
     "    550 5.2.2 mailbox is full\n\n------ This is a copy of the message, including all the headers. ------\n"
     "Received: from a by b for <news@sender.test>\n").encode(),
    (b"From: fbl@isp.test\nSubject: report\nMIME-Version: 1.0\n"
     b'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\n\n--A\nContent-Type: text/plain\n\nx\n'
     b"--A\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nOriginal-Rcpt-To: <g@isp.test>\n--A--\n"),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "repeat"]))
        chunk = draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b"\n", b"\r", b"@", b"--B", b":", b"<", b"5.1.1"]))
        if op == "insert":
            raw[pos:pos] = chunk
        elif op == "delete":
            del raw[pos : pos + len(chunk)]
        else:
            raw[pos:pos] = chunk * draw(st.integers(1, 2000))
    return bytes(raw)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_reports_never_raise_and_stay_bounded(raw):
    report = parse_message(raw)
    assert report.kind in ("dsn", "arf", "autoreply", "reply", "unknown")
    assert len(report.recipients) <= 1000
    assert all("@" in a for a in report.recipients)
