"""Signed return paths and the suppression store."""

from __future__ import annotations

import io

import pytest
from twisted.internet import task

from pymta.envelope import new_qid
from pymta.feedback.suppression import SuppressionPolicy, SuppressionStore
from pymta.feedback.verp import Tagger

SECRET = "0123456789abcdef-test-secret"


def test_return_path_round_trips_and_fits_a_local_part():
    tagger = Tagger(SECRET, "Bounces.Example.Test")
    qid = new_qid()
    address = tagger.return_path(qid, "Carol@Remote.Example")
    local, _, domain = address.partition("@")
    assert domain == "bounces.example.test"
    assert len(local) <= 64
    assert tagger.match_recipients(address.upper(), ["dave@remote.example", "carol@remote.example"]) == (
        qid,
        ["carol@remote.example"],
        "",
    )


def test_forged_or_replayed_tokens_are_ignored():
    tagger = Tagger(SECRET, "bounces.example.test")
    qid = new_qid()
    genuine = tagger.return_path(qid, "carol@remote.example")
    # The genuine token names carol: a bounce claiming dave failed is not about dave.
    assert tagger.match_recipients(genuine, ["dave@remote.example"]) is None
    # Another secret, another domain, or garbage: nothing.
    assert Tagger("another-secret-of-16+", "bounces.example.test").match_recipients(genuine, ["carol@remote.example"]) is None
    assert tagger.match_recipients(genuine.replace("bounces.", "other."), ["carol@remote.example"]) is None
    assert tagger.match_recipients("b-XYZ-abc@bounces.example.test", ["carol@remote.example"]) is None
    tampered = genuine.replace(qid, new_qid())
    assert tagger.match_recipients(tampered, ["carol@remote.example"]) is None


def test_trace_header_carries_the_recipient_and_is_verified():
    tagger = Tagger(SECRET, "bounces.example.test")
    qid = new_qid()
    value = tagger.trace_value(qid, "Carol@Remote.Example")
    assert tagger.parse_trace(value) == (qid, "carol@remote.example")
    assert tagger.parse_trace(value[:-1] + ("a" if value[-1] != "a" else "b")) is None
    assert tagger.parse_trace("nonsense") is None


def test_short_secret_is_refused():
    with pytest.raises(ValueError):
        Tagger("short", "b.example")


@pytest.fixture
def store(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    s = SuppressionStore(str(tmp_path / "s.sqlite"), clock, SuppressionPolicy(soft_threshold=3, soft_window=86400 * 7,
                                                                              soft_duration=86400 * 30))  # fmt: skip
    s.clock_ = clock
    yield s
    s.close()


def test_hard_bounce_and_complaint_suppress_globally(store):
    store.record_bounce("<Carol@Remote.Example>", "userunknown", hard=True)
    entry = store.is_suppressed("carol@remote.example")
    assert entry["reason"] == "userunknown"
    assert entry["source"] == "bounce"
    assert entry["expires"] == 0
    store.record_complaint("dave@remote.example", scope="news.example")
    assert store.is_suppressed("dave@remote.example") is None
    assert store.is_suppressed("dave@remote.example", "news.example")["source"] == "complaint"


def test_soft_bounces_suppress_after_the_threshold_for_a_while(store):
    clock = store.clock_
    for _ in range(2):
        assert store.record_bounce("erin@remote.example", "mailboxfull", hard=False) is None
        clock.advance(86400)
    entry = store.record_bounce("erin@remote.example", "mailboxfull", hard=False)
    assert entry
    assert entry["expires"] == pytest.approx(clock.seconds() + 30 * 86400)
    clock.advance(31 * 86400)
    assert store.is_suppressed("erin@remote.example") is None


def test_soft_bounces_outside_the_window_do_not_add_up(store):
    clock = store.clock_
    for _ in range(3):
        store.record_bounce("frank@remote.example", "mailboxfull", hard=False)
        clock.advance(5 * 86400)
    assert store.is_suppressed("frank@remote.example") is None


def test_add_remove_count_and_csv_round_trip(store, tmp_path):
    store.add("a@x.test", "manual block", "manual")
    store.add("A@X.TEST", "again", "manual")
    assert store.is_suppressed("a@x.test")["count"] == 2
    out = io.StringIO()
    assert store.export_csv(out) == 1
    assert store.remove("a@x.test")
    assert store.is_suppressed("a@x.test") is None
    assert store.import_csv(io.StringIO(out.getvalue())) == 1
    assert store.is_suppressed("a@x.test")["reason"] == "again"
    with pytest.raises(ValueError, match="line 2"):
        store.import_csv(io.StringIO("address,source\nnot-an-address,manual\n"))
    with pytest.raises(ValueError):
        store.add("b@x.test", "r", "carrier-pigeon")


def test_unsubscribe_tokens_are_not_bounce_tokens():
    tagger = Tagger(SECRET, "bounces.example.test")
    qid = new_qid()
    unsub = tagger.unsubscribe_address(qid, "carol@remote.example", "News.Example")
    assert unsub.startswith("u-")
    assert "=news.example@" in unsub
    assert tagger.match_recipients(unsub, ["carol@remote.example"]) is None
    assert tagger.match_recipients(unsub, ["carol@remote.example"], kind="u") == (
        qid, ["carol@remote.example"], "news.example",
    )  # fmt: skip
    # The scope is signed: another sender domain in the address does not verify.
    assert tagger.match_recipients(unsub.replace("=news.example", "=other.example"), ["carol@remote.example"], kind="u") is None
