"""Received accounting records left by the accepting process to the queue manager
(RECEIVED_AT_PICKUP): written at the message's first load, timed at its arrival, on disk before
any rewrite of the queue file drops the flag, and written once."""

from __future__ import annotations

import os

import pytest

from pymta.admin.accounting import RECEIVED_AT_PICKUP, AccountingLog, read_records
from pymta.envelope import ROUTE_RELAY, Envelope, Recipient, new_qid
from pymta.interfaces import DEFERRED, HOLD, INCOMING
from tests.fakes import deferred
from tests.test_accounting import HeldRunner
from tests.test_manager import BODY, Harness


def records(path: str) -> list[dict]:
    return list(read_records(path)) if os.path.exists(path) else []


def make(tmp_path, script=None, run=None, **kw):
    clock_harness = Harness(script)  # only for its clock; the real one is built below with accounting
    clock_harness.manager.stopService()
    path = str(tmp_path / "accounting.jsonl")
    extra = {"run": run} if run is not None else {}
    log = AccountingLog(path, clock_harness.clock, fsync=False, window=0.02, **extra)
    h = Harness(script, clock=clock_harness.clock, accounting=log, **kw)
    return h, path


def queue(h: Harness, rcpts, flagged=True, age=5.0, state=INCOMING, notify=True, **env) -> str:
    qid = new_qid(h.clock.seconds() - age)
    envelope = Envelope(
        qid=qid, sender="s@example.test", arrival=h.clock.seconds() - age, size=len(BODY), client_address="192.0.2.1",
        recipients=[Recipient(a, route=ROUTE_RELAY) for a in rcpts],
        extra={RECEIVED_AT_PICKUP: True, "campaign": "dec"} if flagged else {"campaign": "dec"}, **env,
    )  # fmt: skip
    h.store.enqueue(envelope, BODY, state) if state != INCOMING else h.store.enqueue(envelope, BODY)
    if notify and state == INCOMING:
        h.manager.notify_incoming(qid)
    return qid


def iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def test_the_first_attempt_writes_the_received_records_at_the_arrival_time_before_the_outcomes(tmp_path):
    h, path = make(tmp_path)
    arrival = h.clock.seconds() - 5.0
    qid = queue(h, ["a@remote.example", "b@remote.example"])
    h.clock.advance(0.05)  # the outcome window
    got = records(path)
    assert [(r["event"], r["recipient"]) for r in got] == [
        ("received", "a@remote.example"), ("received", "b@remote.example"),
        ("delivered", "a@remote.example"), ("delivered", "b@remote.example"),
    ]  # fmt: skip
    received = got[0]
    assert received["time"] == iso(arrival)
    assert (received["qid"], received["sender"], received["size"], received["client"], received["route"],
            received["campaign"]) == (qid, "s@example.test", len(BODY), "192.0.2.1", ROUTE_RELAY, "dec")  # fmt: skip
    assert h.store.state(qid) is None


def test_a_message_queued_with_its_records_written_gets_none_from_the_queue_manager(tmp_path):
    h, path = make(tmp_path)
    queue(h, ["a@remote.example"], flagged=False)
    h.clock.advance(0.05)
    assert [r["event"] for r in records(path)] == ["delivered"]


def test_the_flag_leaves_the_queue_file_only_once_its_records_are_on_disk_and_they_are_written_once(tmp_path):
    held = HeldRunner()
    h, path = make(tmp_path, {"a@remote.example": [deferred(), deferred()]}, run=held)
    qid = queue(h, ["a@remote.example"])
    h.clock.advance(0.05)
    assert records(path) == []  # nothing written yet: the file is not rewritten either
    assert h.store.load(qid).extra.get(RECEIVED_AT_PICKUP) is True
    assert h.store.state(qid) != DEFERRED
    held.run_all()
    assert [r["event"] for r in records(path)] == ["received", "deferred"]
    assert h.store.state(qid) == DEFERRED
    assert RECEIVED_AT_PICKUP not in h.store.load(qid).extra
    h.clock.advance(400)  # the second attempt
    h.clock.advance(0.05)
    held.run_all()
    assert [r["event"] for r in records(path)] == ["received", "deferred", "deferred"]


def test_a_message_due_later_has_its_records_written_before_it_is_put_off(tmp_path):
    held = HeldRunner()
    h, path = make(tmp_path, run=held)
    qid = queue(h, ["a@remote.example"], not_before=h.clock.seconds() + 600)
    h.clock.advance(0.05)
    assert h.store.load(qid).extra.get(RECEIVED_AT_PICKUP) is True
    held.run_all()
    assert [r["event"] for r in records(path)] == ["received"]
    assert h.store.state(qid) == DEFERRED
    assert RECEIVED_AT_PICKUP not in h.store.load(qid).extra
    h.clock.advance(700)
    h.clock.advance(0.05)
    held.run_all()
    assert [r["event"] for r in records(path)] == ["received", "delivered"]


def test_deleting_or_bouncing_a_message_never_attempted_writes_its_received_records(tmp_path):
    h, path = make(tmp_path)
    held_qid = queue(h, ["a@remote.example"], state=HOLD)
    h.manager.delete(held_qid)
    h.clock.advance(0.05)
    assert [(r["event"], r["qid"]) for r in records(path)] == [("received", held_qid)]
    assert h.store.state(held_qid) is None
    bounced = queue(h, ["b@remote.example"], state=HOLD)
    h.manager.bounce(bounced, lambda envelope, rcpt: True, "spam run")
    h.clock.advance(0.05)
    assert [(r["event"], r["qid"]) for r in records(path)][1:] == [("received", bounced), ("bounced", bounced)]


@pytest.mark.parametrize("deliver", [True, False])
@pytest.mark.parametrize("worker", [False, True], ids=["main", "listener-worker"])
def test_every_accepting_process_leaves_the_records_to_pickup_exactly_when_the_queue_is_delivered(tmp_path, deliver,
                                                                                                  worker):  # fmt: skip
    """A listener worker does not deliver itself, but the main process does from the same queue."""
    from twisted.internet.testing import MemoryReactorClock

    from pymta.config import build_config
    from pymta.shutdown import SessionDrain
    from pymta.tap import build_service

    config = build_config({"state_dir": str(tmp_path), "hostname": "mx.example.test", "queue": {"deliver": deliver},
                           "smtp": {"listen": ["tcp:0:interface=127.0.0.1"], "processes": 2}})  # fmt: skip
    top = build_service(config, MemoryReactorClock(), worker_fds=[] if worker else None)

    def walk(s):
        yield s
        for child in getattr(s, "services", []):
            yield from walk(child)

    [drain] = [s for s in walk(top) if isinstance(s, SessionDrain)]
    assert [f.delegate.records_at_pickup for f in drain.factories] == [deliver]


def test_a_delete_without_a_queue_manager_keeps_a_message_whose_received_records_cannot_be_written(tmp_path):
    from twisted.internet import defer

    from pymta.admin.queue_ops import QueueOperations, QueueOpError

    h, path = make(tmp_path)
    h.manager.stopService()
    failing = AccountingLog(path, h.clock, fsync=False, run=lambda f: defer.fail(OSError(28, "No space left on device")))
    owing = queue(h, ["a@remote.example"], notify=False)
    outcome = QueueOperations(h.store, accounting=failing).run("delete", owing)
    h.clock.advance(0)
    assert isinstance(outcome.result.value, QueueOpError)
    assert str(outcome.result.value) == f"{owing} not deleted: its received records could not be written"
    outcome.addErrback(lambda _: None)
    assert h.store.state(owing) == INCOMING
    written = AccountingLog(path, h.clock, fsync=False)
    done = QueueOperations(h.store, accounting=written).run("delete", owing)
    h.clock.advance(0)
    assert done.result == {"delete": [owing]}
    assert h.store.state(owing) is None
    assert [(r["event"], r["qid"]) for r in records(path)] == [("received", owing)]
