"""Content scanning before the 250, through the real twistd: a scripted rspamd (HTTP /checkv2) and a
scripted milter (protocol version 6 over TCP) on loopback decide accept, header changes, reject,
tempfail, quarantine into hold/; a milter that hangs or speaks garbage gets the configured default."""

from __future__ import annotations

import smtplib

import pytest

from tests.mta_process import MTAProcess, free_port
from tests.scanners import ScriptedMilter, ScriptedRspamd

pytestmark = pytest.mark.timeout(180)

MESSAGE = b"From: s@remote.test\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\n.dot line\r\nbody\r\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    milter, rspamd = ScriptedMilter(), ScriptedRspamd()
    mta = MTAProcess(str(tmp_path_factory.mktemp("scan")), extra_config=f"""
        [scan]
        rspamd = "http://127.0.0.1:{rspamd.port}"
        timeout = "2s"
        [[scan.milter]]
        socket = "inet:127.0.0.1:{milter.port}"
        """)  # fmt: skip
    mta.start()
    yield mta, milter, rspamd
    mta.stop()
    milter.close()
    rspamd.close()


@pytest.fixture
def scan(setup):
    _mta, milter, rspamd = setup
    milter.mode, milter.add, milter.change, milter.seen[:] = "accept", [("X-Milter", "scanned")], [], []
    rspamd.answer, rspamd.raw, rspamd.requests[:] = {"action": "no action", "score": 0.5}, None, []
    return setup


def send(mta, message: bytes = MESSAGE, rcpts=("alice@example.test",)):
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.ehlo("client.remote.test")
        assert client.mail("s@remote.test")[0] == 250
        for r in rcpts:
            assert client.rcpt(r)[0] == 250
        code, text = client.data(message)
        return code, text.decode()


def held(mta) -> list[str]:
    return mta.queue_files("hold")


def test_clean_message_is_queued_with_the_scanners_headers_and_they_see_the_envelope(scan):
    mta, milter, rspamd = scan
    rspamd.answer = {"action": "add header", "score": 7.1, "milter": {"add_headers": {"X-Spamd-Bar": "+++++++"}}}
    milter.change = [(1, "Subject", "[scanned] hello")]
    assert send(mta)[0] == 250
    [message] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="delivery")
    head = message.split(b"\n\n", 1)[0]
    assert b"X-Milter: scanned" in head
    assert b"X-Spamd-Bar: +++++++" in head
    assert b"X-Spam: Yes" in head
    assert b"Subject: [scanned] hello" in head
    assert b"Subject: hello" not in head
    assert message.endswith(b"\n.dot line\nbody\n")
    seen = milter.seen[0]
    assert seen["sender"] == "<s@remote.test>"
    assert seen["rcpts"] == ["<alice@example.test>"]
    assert seen["macros"]["j"] == "mx.example.test"
    assert seen["macros"]["{mail_addr}"] == "s@remote.test"
    assert seen["macros"]["i"]
    assert seen["macros"]["{client_addr}"] == "127.0.0.1"
    assert [n for n, _ in seen["headers"]][:1] == ["Received"]
    assert ("Subject", "hello") in seen["headers"]
    assert seen["body"] == b".dot line\r\nbody\r\n"
    path, headers, body = rspamd.requests[0]
    names = {k.lower(): v for k, v in headers}
    assert path == "/checkv2"
    assert names["from"] == "s@remote.test"
    assert names["rcpt"] == "alice@example.test"
    assert names["ip"] == "127.0.0.1"
    assert names["helo"] == "client.remote.test"
    assert names["queue-id"]
    assert body.endswith(MESSAGE)


def test_milter_reject_is_550_with_its_text_and_nothing_is_queued(scan):
    mta, milter, _ = scan
    milter.mode = "reject"
    before = mta.maildir_messages("alice@example.test")
    code, text = send(mta)
    assert code == 554
    assert text.startswith("5.7.1 Virus found: Eicar-Test-Signature")
    assert mta.maildir_messages("alice@example.test") == before
    assert any(e.get("event") == "scan_refused" for e in mta.log_events())


def test_milter_tempfail_is_451_4_7_1(scan):
    mta, milter, _ = scan
    milter.mode = "tempfail"
    code, text = send(mta)
    assert code == 451
    assert text.startswith("4.7.1")


def test_milter_reject_at_rcpt_refuses_the_message(scan):
    mta, milter, _ = scan
    milter.mode = "rcpt_reject"
    code, text = send(mta)
    assert code == 550
    assert text.startswith("5.7.1 Recipient refused by policy")


def test_rspamd_reject_uses_its_smtp_message(scan):
    mta, _, rspamd = scan
    rspamd.answer = {"action": "reject", "score": 20, "messages": {"smtp_message": "Spam message rejected; score 20"}}
    code, text = send(mta)
    assert (code, text) == (550, "5.7.1 Spam message rejected; score 20")


def test_rspamd_soft_reject_and_greylist_are_451(scan):
    mta, _, rspamd = scan
    for action in ("soft reject", "greylist"):
        rspamd.answer = {"action": action, "score": 5}
        code, text = send(mta)
        assert code == 451, action
        assert text.startswith("4.7.1"), action


def test_milter_quarantine_puts_the_message_in_hold_not_in_the_mailbox(scan):
    mta, milter, _ = scan
    milter.mode = "quarantine"
    before = held(mta)
    delivered = len(mta.maildir_messages("alice@example.test"))
    assert send(mta, MESSAGE.replace(b"hello", b"quarantine me"))[0] == 250
    [qid] = [q for q in held(mta) if q not in before]
    envelope, body = mta.queued_message(qid)
    assert envelope["extra"]["quarantine"]["reason"] == "virus suspected"
    assert b"quarantine me" in body
    assert len(mta.maildir_messages("alice@example.test")) == delivered
    assert any(e.get("event") == "scan_quarantined" and e.get("qid") == qid for e in mta.log_events())


def test_milter_that_hangs_gets_the_default_action_within_the_timeout(scan):
    mta, milter, _ = scan
    milter.mode = "hang"
    code, text = send(mta)
    assert code == 451
    assert text.startswith("4.7.1")
    assert any(e.get("event") == "scan_error" and e.get("error") == "timed out" for e in mta.log_events())


def test_milter_that_breaks_the_protocol_gets_the_default_action(scan):
    mta, milter, _ = scan
    milter.mode = "garbage"
    code, text = send(mta)
    assert code == 451
    assert text.startswith("4.7.1")
    assert any(e.get("event") == "scan_error" and "milter" in e.get("scanner", "") for e in mta.log_events())


def test_rspamd_that_answers_garbage_gets_the_default_action(scan):
    mta, _, rspamd = scan
    rspamd.raw = b"<html>not json</html>"
    code, _ = send(mta)
    assert code == 451


def test_scanners_down_with_on_error_accept_let_mail_through_unscanned(tmp_path):
    mta = MTAProcess(str(tmp_path), extra_config=f"""
        [scan]
        rspamd = "http://127.0.0.1:{free_port()}"
        on_error = "accept"
        timeout = "2s"
        [[scan.milter]]
        socket = "inet:127.0.0.1:{free_port()}"
        """)  # fmt: skip
    mta.start()
    try:
        assert send(mta)[0] == 250
        mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="delivery")
        errors = [e for e in mta.log_events() if e.get("event") == "scan_error"]
        assert {e["scanner"].split()[0] for e in errors} == {"rspamd", "milter"}
        assert all(e["action"] == "accept" for e in errors)
    finally:
        mta.stop()


def test_milter_flooding_header_changes_gets_the_default_action(scan):
    mta, milter, _ = scan
    milter.add = [("X-Flood", "x")] * 1001
    code, text = send(mta)
    assert code == 451
    assert text.startswith("4.7.1")
