"""A fixed set of threads for blocking file work (fsyncs), lighter than twisted's ThreadPool.

Every queued message makes at least one hop to a thread and back (its fsyncs), so the hop's own
cost counts: through twisted's ThreadPool (context propagation, a coordinator and a worker per
job) a hop took 64-82 µs of CPU, through the standard library's ThreadPoolExecutor (a Future per
job) 79-123 µs, and through a plain ``queue.SimpleQueue`` that the threads block on 50-66 µs
(``bench/thread_hop.py``, runs on different days); each extra lock handoff can also make the
reactor thread wait for the GIL. In the relay benchmark at 2 KB and 10 sessions, alternating the two: 505 against
410 msgs/s and 2.9 against 3.5 ms of CPU per message. :class:`FilePool` offers the part of ThreadPool's API that
:func:`twisted.internet.threads.deferToThreadPool` and :class:`pymta.shutdown.ThreadPoolService`
use, so it is a drop-in where those are the only callers.

Its threads run under Linux's SCHED_BATCH policy: a thread whose fsync returns does not preempt
the running reactor thread, which holds the GIL the woken thread would wait for anyway. Under the
default policy every wake-up was a preemption followed by a wait for the GIL: in the accepting
process at 2 KB and 10 sessions, 10-11 involuntary context switches per message, 3.4 with
SCHED_BATCH, and in the relay benchmark, eight runs of each alternated, a median of 539 against
468 msgs/s (50 KB: even, 420 against 415).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="pymta.threads")

_STOP = object()


def batch_scheduling() -> bool:
    """Put the calling thread under SCHED_BATCH (no wake-up preemption, the same fair share of the
    CPU); False where the platform has no such policy or refuses it."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread
    except (AttributeError, OSError):
        return False
    return True


class FilePool:
    """``size`` threads taking jobs in order from one queue. Jobs given before :meth:`start`
    wait for it; :meth:`stop` lets every job already given finish, then joins the threads; a job
    given after it is refused with RuntimeError (as twisted's pool refuses one after its stop)."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [threading.Thread(target=self._work, name=f"{self.name}-{i}") for i in range(self.size)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped = True
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(_STOP)
        for thread in threads:
            thread.join()

    def callInThreadWithCallback(  # twisted ThreadPool API names
        self, on_result: Callable[[bool, Any], object] | None, func: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        """Run ``func(*args, **kw)`` in a thread, then ``on_result(True, result)`` or
        ``on_result(False, Failure)`` there."""
        if self._stopped:
            raise RuntimeError(f"thread pool {self.name} is stopped")
        self._jobs.put((on_result, func, args, kw))

    def callInThread(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:  # twisted API name
        self.callInThreadWithCallback(None, func, *args, **kw)

    def _work(self) -> None:
        batch_scheduling()
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            on_result, func, args, kw = job
            try:
                result, ok = func(*args, **kw), True
            except BaseException:
                result, ok = Failure(), False
            try:
                if on_result is not None:
                    on_result(ok, result)
                elif not ok:
                    log.failure("work in thread pool {name} failed", result, name=self.name)
            except BaseException:
                log.failure("the result handler in thread pool {name} failed", name=self.name)
            del job, result
