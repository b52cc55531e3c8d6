"""The scan chain and verdict mapping in memory: header edits, rspamd answers, timeouts on a
task.Clock, the on_error default (accept / tempfail), the first refusal ending the chain."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer, task

from pymta.inbound.rspamd import verdict_from_answer
from pymta.inbound.scan import (
    ACCEPT,
    QUARANTINE,
    REJECT,
    TEMPFAIL,
    HeaderEdit,
    ScanChain,
    ScanError,
    ScanRequest,
    Verdict,
    apply_edits,
    scanner_reply,
)

MESSAGE = b"Received: from x\r\nSubject: one\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody\r\n"


def test_header_edits_add_insert_change_and_delete_without_touching_the_body():
    out = apply_edits(MESSAGE, [
        HeaderEdit("add", "X-Scanned", "yes"),
        HeaderEdit("add", "X-First", "top", 0),
        HeaderEdit("change", "subject", "two"),
        HeaderEdit("change", "X-A", "", 2),
    ])  # fmt: skip
    assert out == b"X-First: top\r\nReceived: from x\r\nSubject: two\r\nX-A: 1\r\nX-Scanned: yes\r\n\r\nbody\r\n"


def test_a_scanner_cannot_inject_a_header_line_or_a_bad_name():
    out = apply_edits(MESSAGE, [HeaderEdit("add", "X-Evil", "a\r\nBcc: victim@example.test"),
                                HeaderEdit("add", "Bad Name", "x")])  # fmt: skip
    head = out.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert b"Bcc: victim@example.test" not in head
    assert b"\tBcc: victim@example.test" in head
    assert not any(line.startswith(b"Bad Name") for line in head)


def test_scanner_replies_keep_the_class_right():
    assert scanner_reply(554, "5.7.1", "Virus", REJECT).code == 554
    assert (scanner_reply(250, None, "huh", REJECT).code, scanner_reply(250, None, "huh", REJECT).enhanced) == (550, "5.7.1")
    assert scanner_reply(421, "4.3.2", "busy", TEMPFAIL).enhanced == "4.3.2"
    assert scanner_reply(450, "5.1.1", "mixed", TEMPFAIL).enhanced == "4.7.1"


@pytest.mark.parametrize(("answer", "action", "code"), [
    ({"action": "no action"}, ACCEPT, None),
    ({"action": "reject"}, REJECT, 550),
    ({"action": "soft reject"}, TEMPFAIL, 451),
    ({"action": "greylist"}, TEMPFAIL, 451),
])  # fmt: skip
def test_rspamd_actions(answer, action, code):
    verdict = verdict_from_answer(json.dumps(answer).encode())
    assert verdict.action == action
    assert (verdict.reply.code if verdict.reply else None) == code


def test_rspamd_rewrite_subject_and_milter_headers():
    verdict = verdict_from_answer(json.dumps({
        "action": "rewrite subject", "subject": "***SPAM*** one",
        "milter": {"add_headers": {"X-Spamd-Result": {"value": "default: True", "order": 0}},
                   "remove_headers": {"X-A": 0}},
    }).encode())  # fmt: skip
    out = apply_edits(MESSAGE, verdict.edits)
    assert b"Subject: ***SPAM*** one\r\n" in out
    assert b"X-Spamd-Result: default: True\r\n" in out
    assert b"X-A: 1\r\n" not in out


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"action": 3}', b'{"action": "explode"}'])
def test_rspamd_nonsense_is_a_scan_error(body):
    with pytest.raises(ScanError):
        verdict_from_answer(body)


class Scripted:
    def __init__(self, name, result=None, on_error=TEMPFAIL, timeout=5.0):
        self.name, self.result, self.on_error, self.timeout, self.calls = name, result, on_error, timeout, 0

    def scan(self, request):
        self.calls += 1
        if self.result is None:
            return defer.Deferred()  # never answers
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)


REQUEST = ScanRequest("Q1", "s@remote.test", ["a@example.test"], MESSAGE)


def run(chain, clock, advance=0.0):
    results = []
    chain.scan(REQUEST).addBoth(results.append)
    clock.advance(advance)
    return results


def test_a_hanging_scanner_times_out_on_the_clock_and_gets_its_default():
    clock = task.Clock()
    accept = Scripted("a", None, on_error=ACCEPT, timeout=5)
    tempfail = Scripted("b", None, on_error=TEMPFAIL, timeout=5)
    results = run(ScanChain([accept, tempfail], clock), clock, 4.9)
    assert results == []
    clock.advance(0.1)  # the first times out: accepted unscanned, the second starts
    assert results == []
    assert tempfail.calls == 1
    clock.advance(5)
    [verdict] = results
    assert verdict.action == TEMPFAIL
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")


def test_the_first_refusal_ends_the_chain_and_edits_and_quarantine_combine():
    clock = task.Clock()
    reject = Verdict(REJECT, scanner_reply(550, "5.7.1", "no", REJECT))
    later = Scripted("later", Verdict())
    [verdict] = run(ScanChain([Scripted("r", reject), later], clock), clock)
    assert verdict.action == REJECT
    assert verdict.scanner == "r"
    assert later.calls == 0
    first = Verdict(edits=[HeaderEdit("add", "X-One", "1")])
    second = Verdict(QUARANTINE, edits=[HeaderEdit("add", "X-Two", "2")], quarantine="virus")
    [verdict] = run(ScanChain([Scripted("a", first), Scripted("b", second),
                               Scripted("c", ScanError("broken"), on_error=ACCEPT)], clock), clock)  # fmt: skip
    assert verdict.action == QUARANTINE
    assert verdict.quarantine == "virus"
    assert verdict.scanner == "b"
    assert [e.name for e in verdict.edits] == ["X-One", "X-Two"]


def test_scan_config_errors_are_one_line_naming_the_key():
    from pymta.config import ConfigError, build_config

    config = build_config({"scan": {"rspamd": "http://127.0.0.1:11333", "milter": [{"socket": "inet:127.0.0.1:8891"},
                           {"socket": "unix:/run/clamav/clamav-milter.ctl", "on_error": "accept"}]}}, "p.toml")  # fmt: skip
    assert config.scan.on_error == "tempfail"
    assert len(config.scan.milter) == 2
    for table, key in [({"milter": [{}]}, "scan.milter[1].socket"), ({"milter": [{"socket": "tcp:x"}]}, "scan.milter[1].socket"),
                       ({"on_error": "maybe"}, "scan.on_error"), ({"rspamd": "ftp://x"}, "scan.rspamd"),
                       ({"milter": {"socket": "inet:a:1"}}, "scan.milter"), ({"bogus": 1}, "scan.bogus")]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            build_config({"scan": table}, "p.toml")
        assert str(e.value).startswith(f"p.toml: {key}: ")
        assert "\n" not in str(e.value)
