"""Operator commands through QueueOperations, as the control socket runs them, on task.Clock with
the in-memory store: flush (all, one id, one domain) lifts shaping pauses and dead-site
suspensions; hold and release of a message being delivered; shaping filtered by domain."""

from __future__ import annotations

import pytest
from twisted.internet import task

from pymta.admin.queue_ops import QueueOperations, QueueOpError
from pymta.config import build_config
from pymta.interfaces import DEFERRED, HOLD
from pymta.outbound.shaping import Limits, Shaper
from tests.fakes import OK, deferred
from tests.test_manager import Harness


def result_of(d):
    out: list = []
    d.addBoth(out.append)
    [value] = out
    if isinstance(value, Exception) or hasattr(value, "raiseException"):
        value.raiseException()
    return value


@pytest.fixture
def world():
    h = Harness({"a@dead.example": [deferred(421, "4.4.1", "connection refused"), OK],
                 "b@slow.example": [deferred(), OK], "c@slow.example": [deferred(), OK]})  # fmt: skip
    shaper = Shaper(h.clock, Limits(connections=10))
    ops = QueueOperations(h.store, h.manager, shaper)
    return h, shaper, ops


def suspend(shaper: Shaper, domain: str, mx: str) -> str:
    key, _ = shaper.destination(domain, (mx,))
    for _ in range(5):
        shaper.connection_failed(key, "connection refused")
    return key


def test_flush_lifts_dead_site_suspensions_and_pauses_and_retries_everything_now(world):
    h, shaper, ops = world
    dead = suspend(shaper, "dead.example", "mx.dead.example")
    paused, _ = shaper.destination("slow.example", ("mx.slow.example",))
    shaper.observe(paused, 421, "4.7.28", "rate limited")
    assert shaper.hold_until(dead, Limits()) > h.clock.seconds()
    assert shaper.hold_until(paused, Limits()) > 0
    q1, q2 = h.queue(["a@dead.example"]), h.queue(["b@slow.example"])
    assert h.store.state(q1) == h.store.state(q2) == DEFERRED
    answer = result_of(ops.run("flush"))
    assert answer == {"flushed": 2, "resumed": sorted([dead, paused])}
    assert shaper.hold_until(dead, Limits()) == 0.0
    assert shaper.explain(paused)["share"] == 1.0
    h.clock.advance(0)
    assert h.store.state(q1) is None
    assert h.store.state(q2) is None


def test_flush_id_retries_only_that_message(world):
    h, _shaper, ops = world
    q1, q2 = h.queue(["b@slow.example"]), h.queue(["c@slow.example"])
    assert result_of(ops.run("flush", q2)) == {"flushed": 1, "qid": q2, "state": DEFERRED}
    h.clock.advance(0)
    assert h.store.state(q1) == DEFERRED
    assert h.store.state(q2) is None
    with pytest.raises(QueueOpError, match="no message"):
        result_of(ops.run("flush", "NOSUCHID"))
    result_of(ops.run("hold", q1))
    with pytest.raises(QueueOpError, match="on hold"):
        result_of(ops.run("flush", q1))


def test_flush_domain_retries_that_domain_and_lifts_only_its_suspension(world):
    h, shaper, ops = world
    dead = suspend(shaper, "dead.example", "mx.dead.example")
    other = suspend(shaper, "other.example", "mx.other.example")
    q1, q2 = h.queue(["a@dead.example"]), h.queue(["b@slow.example"])
    answer = result_of(ops.run("flush", None, "Dead.Example"))
    assert answer == {"flushed": 1, "domain": "dead.example", "resumed": [dead]}
    assert shaper.hold_until(dead, Limits()) == 0.0
    assert shaper.hold_until(other, Limits()) > 0
    h.clock.advance(0)
    assert h.store.state(q1) is None
    assert h.store.state(q2) == DEFERRED


def test_shaping_with_a_domain_shows_only_the_destinations_it_goes_through(world):
    _h, shaper, ops = world
    dead = suspend(shaper, "dead.example", "mx.dead.example")
    suspend(shaper, "other.example", "mx.other.example")
    shaper.destination("dead.example", ("mx.dead.example",))
    explained = result_of(ops.run("shaping", "dead.example"))["destinations"]
    assert [d["key"] for d in explained] == [dead]
    assert explained[0]["reason"].startswith("dead site")
    assert len(result_of(ops.run("shaping"))["destinations"]) == 2
    assert result_of(ops.run("shaping", "unknown.example"))["destinations"] == []


def test_hold_of_a_message_in_flight_waits_for_the_attempt_then_holds():
    h = Harness({"a@remote.example": [deferred()]}, hold=True)
    ops = QueueOperations(h.store, h.manager)
    qid = h.queue(["a@remote.example"])
    assert result_of(ops.run("hold", qid)) == {"hold": [qid], "after_attempt": [qid]}
    assert h.store.state(qid) != HOLD  # the attempt is still running
    h.relay.release_all()
    assert h.store.state(qid) == HOLD
    assert h.manager.scheduler.when(qid) is None
    h.clock.advance(100_000)
    assert len(h.relay.calls) == 1


def test_hold_then_release_of_a_message_in_flight_leaves_it_queued_not_held():
    h = Harness({"a@remote.example": [deferred(), OK]}, hold=True)
    ops = QueueOperations(h.store, h.manager)
    qid = h.queue(["a@remote.example"])
    result_of(ops.run("hold", qid))
    result_of(ops.run("release", qid))
    h.relay.release_all()
    assert h.store.state(qid) == DEFERRED
    assert h.manager.scheduler.when(qid) is not None
    h.clock.advance(3600)
    h.relay.release_all()
    assert h.store.state(qid) is None
    assert len(h.relay.calls) == 2


def test_a_hold_asked_during_an_attempt_that_ends_early_still_holds():
    h = Harness(hold=True)
    qid = h.queue(["a@remote.example"], not_before=h.clock.seconds() + 600)  # the attempt only reschedules
    ops = QueueOperations(h.store, h.manager)
    result_of(ops.run("hold", qid))
    assert h.store.state(qid) == HOLD


def test_dead_site_pause_is_configurable_and_zero_never_suspends():
    config = build_config({"shaping": {"default": {"dead_site_pause": "2m"}, "domain": {
        "never.example": {"dead_site_pause": 0}}}}, "t.toml")  # fmt: skip
    assert config.shaping.default.dead_site_pause == 120.0
    clock = task.Clock()
    shaper = Shaper(clock, Limits(dead_site_pause=120.0), {"never.example": Limits(dead_site_pause=0.0)})
    key, limits = shaper.destination("dead.example", ("mx.dead.example",))
    shaper.acquire_connection(key, limits)
    for _ in range(5):
        shaper.connection_failed(key, "connection refused")
    assert shaper.hold_until(key, limits) == pytest.approx(120.0)
    key, limits = shaper.destination("never.example", ("mx.never.example",))
    shaper.acquire_connection(key, limits)
    for _ in range(10):
        shaper.connection_failed(key, "connection refused")
    assert shaper.hold_until(key, limits) == 0.0


def test_list_with_a_limit_gives_the_oldest_messages_first_and_refuses_a_bad_limit():
    h = Harness({"x@remote.example": [deferred()] * 5})
    qids = sorted(h.queue(["x@remote.example"]) for _ in range(5))
    ops = QueueOperations(h.store, h.manager)
    page = result_of(ops.run("list", args={"limit": 2}))
    assert [m["qid"] for m in page] == qids[:2]
    assert all(m["state"] == DEFERRED and m["recipients"][0]["address"] == "x@remote.example" for m in page)
    assert [m["qid"] for m in result_of(ops.run("list"))] == qids
    for bad in (0, -1, "10", True):
        with pytest.raises(QueueOpError, match="limit"):
            result_of(ops.run("list", args={"limit": bad}))
