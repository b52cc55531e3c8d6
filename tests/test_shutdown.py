"""The stop path on task.Clock: stages in order and bounded, the queue manager's grace and abort,
SMTP sessions drained with 421 4.3.2 after the answer they are owed."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task

from pymta.envelope import DEFERRED as R_DEFERRED
from pymta.envelope import DeliveryResult
from pymta.interfaces import DEFERRED
from pymta.shutdown import CLOSE, FRONT_SLACK, POOLS, SessionDrain, StagedService, wait_at_most
from tests.test_manager import Harness
from tests.test_smtp_server import Client


class Recorder(service.Service):
    def __init__(self, name: str, log: list[str], stage: int | None = None, answer: defer.Deferred | None = None):
        self.name = name
        self.log = log
        self.answer = answer
        if stage is not None:
            self.stop_stage = stage

    def stopService(self):
        super().stopService()
        self.log.append(self.name)
        return self.answer


def test_stages_stop_in_order_each_waiting_for_the_one_before():
    clock = task.Clock()
    log: list[str] = []
    front_done: defer.Deferred = defer.Deferred()
    top = StagedService(clock, grace=30)
    Recorder("pool", log, POOLS).setServiceParent(top)
    Recorder("accounting", log, CLOSE).setServiceParent(top)
    Recorder("manager", log, answer=front_done).setServiceParent(top)
    Recorder("listener", log).setServiceParent(top)
    top.startService()
    stopped = top.stopService()
    assert log == ["listener", "manager"]  # the first stage all at once
    clock.advance(10)
    assert log == ["listener", "manager"]
    assert not stopped.called
    front_done.callback(None)
    assert log == ["listener", "manager", "accounting", "pool"]
    assert stopped.called


def test_a_stage_that_does_not_finish_is_given_up_on_after_its_bound():
    clock = task.Clock()
    log: list[str] = []
    top = StagedService(clock, grace=30)
    Recorder("pool", log, POOLS).setServiceParent(top)
    Recorder("stuck", log, answer=defer.Deferred()).setServiceParent(top)
    top.startService()
    stopped = top.stopService()
    clock.advance(30 + FRONT_SLACK - 0.1)
    assert log == ["stuck"]
    assert not stopped.called
    clock.advance(0.2)
    assert log == ["stuck", "pool"]
    assert stopped.called


def test_wait_at_most_never_cancels_what_it_waits_for():
    clock = task.Clock()
    d: defer.Deferred = defer.Deferred()
    outcome = []
    wait_at_most(d, 5, clock).addCallback(outcome.append)
    clock.advance(5)
    assert outcome == [False]
    d.callback("late")  # still usable, no CancelledError
    assert d.result == "late"


def _interrupted(results_for):
    return [DeliveryResult(a, R_DEFERRED, 451, "4.3.2", "Delivery interrupted") for a in results_for]


def _stopping_with_one_delivery_in_flight():
    """(harness, qid, the stop's Deferred, abort calls): the manager stops with a 30 s grace."""
    aborted: list[bool] = []
    h = Harness(hold=True, shutdown_grace=30, abort=lambda: aborted.append(True))
    qid = h.queue(["a@remote.example"])
    return h, qid, h.manager.stopService(), aborted


def test_the_manager_waits_the_grace_then_aborts_and_records_the_rest_deferred():
    h, qid, stopped, aborted = _stopping_with_one_delivery_in_flight()
    h.clock.advance(29.9)
    assert not aborted
    assert not stopped.called
    h.clock.advance(0.2)
    assert aborted == [True]
    assert not stopped.called
    [(d, _)] = h.relay.pending
    d.callback(_interrupted(["a@remote.example"]))  # what the aborted agent answers
    assert stopped.called
    assert h.store.state(qid) == DEFERRED
    [rcpt] = h.store.load(qid).recipients
    assert rcpt.reply["enhanced"] == "4.3.2"


def test_deliveries_that_finish_within_the_grace_are_recorded_and_nothing_is_aborted():
    h, qid, stopped, aborted = _stopping_with_one_delivery_in_flight()
    h.clock.advance(5)
    h.relay.release_all()
    assert stopped.called
    assert h.store.state(qid) is None
    h.clock.advance(60)
    assert not aborted


def test_sessions_get_a_grace_then_421_4_3_2_after_the_answer_they_are_owed():
    idle = Client()
    idle.ready()
    busy = Client()
    busy.ready()
    busy.delegate.defer_message = True
    busy.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    busy.send("Subject: x\r\n\r\nbody\r\n.\r\n")  # the queue write is pending
    clock = task.Clock()
    drain = SessionDrain([idle.factory, busy.factory], clock, grace=5)
    drain.startService()
    stopped = drain.stopService()
    clock.advance(4.9)
    assert idle.take() == b""
    assert not idle.closed
    clock.advance(0.2)
    assert idle.take().startswith(b"421 4.3.2 ")
    assert idle.closed
    assert busy.take() == b""
    assert not busy.closed
    busy.delegate.pending[0].callback(None)
    out = busy.take()
    assert out.startswith(b"250 ")
    assert b"\r\n421 4.3.2 " in out
    assert busy.closed
    for client in (idle, busy):
        client.proto.connectionLost(None)
    assert stopped.called


def test_a_stop_without_sessions_does_not_wait():
    c = Client()
    c.proto.connectionLost(None)
    drain = SessionDrain([c.factory], task.Clock(), grace=5)
    drain.startService()
    assert drain.stopService() is None
