"""Runs ``parse_message`` in worker processes, so a bounce never holds the reactor (or, since
``re`` keeps the GIL while it matches, any thread of it) for the length of a parse.

Each parse has a time limit: past it the report is ``unknown``, the worker processes are
replaced and the next parse starts on a fresh pool. What a worker is given is cut to
``max_bytes`` first.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pymta.feedback.parse import MAX_MESSAGE_BYTES, UNKNOWN, Report, parse_message

log = Logger(namespace="pymta.feedback")


class ParsePool:
    """``parse(raw) -> Deferred[Report]`` on ``workers`` processes (started on first use)."""

    def __init__(
        self,
        reactor: Any,
        workers: int = 1,
        timeout: float = 30.0,
        max_bytes: int = MAX_MESSAGE_BYTES,
        function: Callable[[bytes], Report] = parse_message,  # a module-level function (it is pickled)
    ) -> None:
        self.reactor = reactor
        self.function = function
        self.workers = workers
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._executor: ProcessPoolExecutor | None = None

    def parse(self, raw: bytes) -> defer.Deferred[Report]:
        d: defer.Deferred[Report] = defer.Deferred()
        if self._executor is None:
            # forkserver: workers do not inherit the reactor's threads and sockets
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"))
        executor = self._executor
        try:
            future = executor.submit(self.function, raw[: self.max_bytes])
        except Exception as e:  # a broken pool (a worker died): start a new one next time
            log.warn("feedback parse pool unusable: {error}", error=str(e), event="feedback_parse_failed")
            self._replace(executor)
            d.callback(Report(kind=UNKNOWN))
            return d
        timer = self.reactor.callLater(self.timeout, self._expired, executor, future, d, len(raw))
        future.add_done_callback(lambda f: self.reactor.callFromThread(self._done, f, d, timer))
        return d

    def _done(self, future: Future[Any], d: defer.Deferred[Report], timer: Any) -> None:
        if d.called:
            return
        timer.cancel()
        try:
            report = future.result()
        except Exception as e:
            log.warn("feedback parse failed: {error}", error=str(e), event="feedback_parse_failed")
            report = Report(kind=UNKNOWN)
        d.callback(report)

    def _expired(self, executor: ProcessPoolExecutor, future: Future[Any], d: defer.Deferred[Report], size: int) -> None:
        if d.called:
            return
        log.warn("feedback parse of {size} bytes took over {timeout} s: treated as unknown, workers replaced",
                 size=size, timeout=self.timeout, event="feedback_parse_timeout")  # fmt: skip
        self._replace(executor)
        d.callback(Report(kind=UNKNOWN))

    def _replace(self, executor: ProcessPoolExecutor) -> None:
        if self._executor is executor:
            self._executor = None
        # a running task cannot be cancelled: end the workers (ProcessPoolExecutor keeps them in _processes)
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False, cancel_futures=True)
