"""Retries and expiry on a monotonic clock: the wall clock stepping back 2 h or forward a day
neither freezes the queue nor fires a burst of delay notices; after a restart the written-down
next attempt still means the remaining delay; the real reactor gets a monotonic clock."""

from __future__ import annotations

import email
import queue
import random
import threading
import time
import tracemalloc
from email.utils import parsedate_to_datetime

from twisted.internet import task

from pymta.envelope import ROUTE_LOCAL, ROUTE_RELAY, Envelope, Recipient, new_qid
from pymta.interfaces import DEFERRED
from pymta.queue.manager import QueueManager
from pymta.queue.scheduler import MonotonicClock
from pymta.queue.store import MemoryQueueStore
from tests.fakes import OK, ScriptedDeliveryAgent, deferred

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
WALL_START = 1_700_000_000.0


class Clocks:
    """A monotonic clock and a wall clock that tests step apart."""

    def __init__(self, mono_start: float = 1000.0) -> None:
        self.mono = task.Clock()
        self.mono.advance(mono_start)
        self.wall = task.Clock()
        self.wall.advance(WALL_START)

    def elapse(self, seconds: float) -> None:
        """Real time passes: both clocks move (timers are armed on the monotonic one)."""
        self.wall.advance(seconds)
        self.mono.advance(seconds)


def manager(clocks: Clocks, store: MemoryQueueStore, relay: ScriptedDeliveryAgent, local=None) -> QueueManager:
    m = QueueManager(
        store, {ROUTE_RELAY: relay, ROUTE_LOCAL: local or ScriptedDeliveryAgent()}, clocks.mono, "mx.example.test",
        retry_initial=300, retry_max=3600, max_age=5 * 86400, delay_warning=4 * 3600, rng=random.Random(3),
        route_for=lambda a: ROUTE_LOCAL if a.endswith("@example.test") else ROUTE_RELAY, wall=clocks.wall,
    )  # fmt: skip
    m.startService()
    return m


def queue_one(clocks: Clocks, store: MemoryQueueStore, m: QueueManager, rcpt: str) -> str:
    qid = new_qid()
    store.enqueue(Envelope(qid=qid, sender="s@example.test", arrival=clocks.wall.seconds(),
                           recipients=[Recipient(rcpt, route=ROUTE_RELAY)]), BODY)  # fmt: skip
    m.notify_incoming(qid)
    return qid


def test_a_wall_clock_step_back_of_two_hours_does_not_freeze_retries():
    clocks, store = Clocks(), MemoryQueueStore()
    relay = ScriptedDeliveryAgent({"a@remote.example": [deferred(), OK]})
    m = manager(clocks, store, relay)
    qid = queue_one(clocks, store, m, "a@remote.example")
    assert store.state(qid) == DEFERRED
    delay = store.load(qid).next_attempt - clocks.wall.seconds()
    assert 270 <= delay <= 330
    clocks.wall.advance(-7200)  # NTP steps the clock back two hours
    clocks.elapse(delay + 1)
    assert len(relay.calls) == 2
    assert store.state(qid) is None


def test_a_wall_clock_step_forward_of_a_day_fires_no_delay_notices_and_expires_nothing():
    clocks, store = Clocks(), MemoryQueueStore()
    relay = ScriptedDeliveryAgent({f"r{n}@remote.example": [deferred()] for n in range(20)})
    local = ScriptedDeliveryAgent()
    m = manager(clocks, store, relay, local)
    qids = [queue_one(clocks, store, m, f"r{n}@remote.example") for n in range(20)]
    clocks.wall.advance(86400)  # the clock jumps a day ahead
    clocks.elapse(400)  # every message is retried once
    assert len(relay.calls) == 40
    assert local.calls == []  # no delay notice: the messages are minutes old, not a day
    assert all(store.state(q) == DEFERRED for q in qids)
    # The delay notice comes when a message really is four hours old, with Will-Retry-Until from then.
    clocks.elapse(4 * 3600)
    assert len(local.calls) == 20
    notice = email.message_from_bytes(local.calls[0][2])
    report = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status").as_string()
    until = next(line for line in report.splitlines() if line.startswith("Will-Retry-Until:")).split(":", 1)[1]
    expected = clocks.wall.seconds() + 5 * 86400 - (4 * 3600 + 400)  # the remaining lifetime, on the wall clock
    assert abs(parsedate_to_datetime(until.strip()).timestamp() - expected) <= 3600


def test_after_a_restart_the_next_attempt_is_the_remaining_delay_and_absurd_times_are_clamped():
    store = MemoryQueueStore()
    soon, far, past = new_qid(), new_qid(), new_qid()
    for qid, next_attempt in ((soon, WALL_START + 600), (far, WALL_START + 50 * 365 * 86400), (past, WALL_START - 3600)):
        env = Envelope(qid=qid, sender="s@example.test", arrival=WALL_START - 60,
                       recipients=[Recipient("a@remote.example", route=ROUTE_RELAY)], next_attempt=next_attempt)  # fmt: skip
        store.enqueue(env, BODY)
        store.move(qid, DEFERRED)
    restarted = Clocks(mono_start=5.0)  # a new process: the monotonic clock starts anywhere
    relay = ScriptedDeliveryAgent({"a@remote.example": [deferred()]})
    m = manager(restarted, store, relay)
    restarted.mono.advance(0)
    assert [c[0] for c in relay.calls] == [past]  # overdue: at once
    assert m.scheduler.when(soon) == 5.0 + 600  # the remaining delay, on the monotonic clock
    assert m.scheduler.when(far) == 5.0 + 86400  # not fifty years: the longest regular wait


class ThreadReactor:
    """Just what MonotonicClock needs from a reactor; calls from the helper thread land in a queue."""

    def __init__(self) -> None:
        self.from_thread: queue.Queue = queue.Queue()
        self.triggers: list = []

    def callFromThread(self, f, *args) -> None:
        self.from_thread.put((f, args))

    def addSystemEventTrigger(self, phase, event, f) -> None:
        self.triggers.append(f)

    def run_next(self, seconds: float = 10.0) -> None:
        f, args = self.from_thread.get(timeout=seconds)
        f(*args)


def test_the_monotonic_clock_runs_calls_in_order_on_the_reactor_thread_and_skips_cancelled_ones(monkeypatch):
    reactor = ThreadReactor()
    clock = MonotonicClock(reactor)
    fired: list[str] = []
    monkeypatch.setattr(time, "time", lambda: 0.0)  # whatever the wall clock says
    start = clock.seconds()
    clock.callLater(0.2, fired.append, "second")
    clock.callLater(0.05, fired.append, "first")
    cancelled = clock.callLater(0.1, fired.append, "cancelled")
    cancelled.cancel()
    while len(fired) < 2:
        reactor.run_next()
    assert fired == ["first", "second"]
    assert clock.seconds() - start >= 0.2
    assert threading.current_thread() is threading.main_thread()  # they ran here, not in the helper thread
    for stop in reactor.triggers:
        stop()


def test_cancelled_calls_do_not_pile_up_in_the_monotonic_clock():
    reactor = ThreadReactor()
    clock = MonotonicClock(reactor)
    earliest = clock.callLater(600, lambda: None)  # stays armed, above the cancelled ones
    clock.callLater(3600, lambda: None).cancel()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5_000):  # the scheduler re-arming its one timer again and again
            clock.callLater(3600, lambda: None).cancel()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert clock.getDelayedCalls() == [earliest]
    assert grown < 100_000
    for stop in reactor.triggers:
        stop()
