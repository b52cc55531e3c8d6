"""When work is due: a timer heap on an injected clock (one callLater for the earliest key), the
jittered exponential retry schedule, and the monotonic clock the real reactor lacks."""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pymta.interfaces import IScheduler

log = Logger(namespace="pymta.queue.scheduler")


def retry_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None, jitter: float = 0.1) -> float:
    """Seconds before attempt ``attempt + 1``: initial * 2**(attempt-1), capped at maximum, ± jitter."""
    attempt = max(attempt, 1)
    base: float = min(initial * (2 ** min(attempt - 1, 40)), maximum)
    spread = (rng or random).uniform(-jitter, jitter)
    return max(1.0, min(base * (1 + spread), maximum))


@implementer(IScheduler)
class TimerHeapScheduler:
    """Keys due at absolute times; ``on_due(key)`` is called when a key's time has come.

    A heap of (when, seq, key) with lazy deletion; exactly one timer armed for the earliest entry.
    """

    def __init__(self, clock: IReactorTime, on_due: Callable[[Hashable], Any] | None = None) -> None:
        self.clock = clock
        self.on_due: Callable[[Hashable], Any] = on_due or (lambda key: None)  # set by the owner
        self._heap: list[tuple[float, int, Hashable]] = []
        self._when: dict[Hashable, tuple[float, int]] = {}
        self._seq = itertools.count()
        self._timer: Any = None
        self._timer_at: float | None = None

    def schedule(self, key: Hashable, when: float) -> None:
        entry = (when, next(self._seq))
        self._when[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        self._arm()

    def cancel(self, key: Hashable) -> None:
        if self._when.pop(key, None) is not None:
            self._arm()

    def when(self, key: Hashable) -> float | None:
        entry = self._when.get(key)
        return entry[0] if entry else None

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._when

    def due_now(self) -> None:
        """Make every scheduled key due at once (flush)."""
        now = self.clock.seconds()
        for key in list(self._when):
            self.schedule(key, now)

    def stop(self) -> None:
        """Disarm the timer (keys stay scheduled; the next ``schedule`` arms it again)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._when.get(heap[0][2]) != (heap[0][0], heap[0][1]):
            heapq.heappop(heap)

    def _arm(self) -> None:
        self._drop_stale()
        if not self._heap:
            self.stop()
            return
        at = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer_at == at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        now = self.clock.seconds()
        due = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._when[key]
            due.append(key)
        self._arm()
        for key in due:
            self.on_due(key)


class MonotonicCall:
    """One call of :class:`MonotonicClock` (the part of ``IDelayedCall`` the scheduler uses)."""

    def __init__(self, time: float, f: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        self.time = time
        self._f, self._args, self._kw = f, args, kw
        self.cancelled = self.called = False

    def getTime(self) -> float:
        return self.time

    def active(self) -> bool:
        return not (self.cancelled or self.called)

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        if self.active():
            self.called = True
            self._f(*self._args, **self._kw)


class MonotonicClock:
    """``seconds()`` and ``callLater()`` on ``time.monotonic`` for the real reactor.

    The reactor's own timers follow the wall clock: set it back two hours and they wait two hours
    more; set it forward and they fire at once. Here a helper thread sleeps on the monotonic clock
    (``threading.Condition.wait``) and hands due calls to the reactor thread, where they run.
    """

    def __init__(self, reactor: Any, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.reactor = reactor
        self._monotonic = monotonic
        self._heap: list[tuple[float, int, MonotonicCall]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._compact_at = 64  # cancelled calls stay in the heap until then (amortised clean-up)

    def seconds(self) -> float:
        return self._monotonic()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> MonotonicCall:
        call = MonotonicCall(self.seconds() + max(0.0, delay), f, args, kw)
        with self._cond:
            heapq.heappush(self._heap, (call.time, next(self._seq), call))
            if len(self._heap) > self._compact_at:
                self._heap[:] = [entry for entry in self._heap if entry[2].active()]
                heapq.heapify(self._heap)
                self._compact_at = max(64, 2 * len(self._heap))
            self._cond.notify()
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._wait_loop, name="pymta-monotonic-timer", daemon=True)
                self._thread.start()
                self.reactor.addSystemEventTrigger("after", "shutdown", self.stop)
        return call

    def getDelayedCalls(self) -> list[MonotonicCall]:
        with self._cond:
            return [call for _, _, call in self._heap if call.active()]

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _wait_loop(self) -> None:
        """(helper thread) Sleep until the earliest call is due, then pass the due calls on."""
        with self._cond:
            while not self._stopped:
                heap = self._heap
                while heap and not heap[0][2].active():
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                wait = heap[0][0] - self._monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                due = []
                while heap and heap[0][0] <= self._monotonic():
                    due.append(heapq.heappop(heap)[2])
                self.reactor.callFromThread(self._run, due)

    @staticmethod
    def _run(due: list[MonotonicCall]) -> None:
        for call in due:
            try:
                call.run()  # a call cancelled since it was handed over does nothing
            except Exception:
                log.failure("timed call {call} failed", call=call._f)
