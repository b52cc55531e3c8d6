"""Clean, bounded shutdown: what stops first, what waits for what, and for how long at most.

On SIGTERM the service tree stops in stages:

1. ``FRONT``, all at once: listeners close (no new connection is accepted), SMTP sessions in
   progress get a short grace and then ``421 4.3.2``, listener workers are told to stop and
   waited for, the queue manager lets deliveries in flight finish up to ``[queue] shutdown_grace``
   and then aborts them (their outcome is written to the queue and the accounting log).
2. ``CLOSE``: what the first stage still used: idle outbound connections, the suppression
   store, the accounting log.
3. ``POOLS``: the thread pools that ran the file, DNS and hashing work of the stages before.

Every stage is bounded, so the process exits within the grace plus a few seconds whatever a
peer, a resolver or a disk does. A second SIGTERM or SIGINT while stopping is harmless.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pymta.threads import FilePool

log = Logger(namespace="pymta.shutdown")

FRONT, CLOSE, POOLS = 0, 1, 2
CLOSE_LIMIT = 1.0  # seconds the CLOSE stage may take
FRONT_SLACK = 3.0  # seconds the FRONT stage may take beyond the delivery grace
SESSION_GRACE = 5.0  # seconds SMTP sessions in progress may go on before 421 4.3.2 (at most the grace)


def wait_at_most(d: defer.Deferred[Any], seconds: float, clock: Any) -> defer.Deferred[bool]:
    """Fires True when ``d`` fires, or False after ``seconds``; ``d`` itself is never cancelled."""
    out: defer.Deferred[bool] = defer.Deferred()

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not out.called:
            out.callback(True)
        return result

    def late() -> None:
        if not out.called:
            out.callback(False)

    timer = clock.callLater(max(0.0, seconds), late)
    d.addBoth(done)
    return out


class StagedService(service.MultiService):
    """A MultiService whose children stop stage by stage, each stage bounded in time.

    A child's ``stop_stage`` attribute names its stage; without one it stops in the first
    stage (as in a plain MultiService, all at once).
    """

    def __init__(self, clock: Any, grace: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.clock = clock
        self.grace = grace

    def stopService(self) -> defer.Deferred[Any]:
        service.Service.stopService(self)
        log.info("stopping: accepting no new mail; deliveries in flight get up to {grace}s", grace=self.grace,
                 event="shutdown")  # fmt: skip
        return defer.ensureDeferred(self._stop_in_stages())

    async def _stop_in_stages(self) -> None:
        children = list(self)
        limits = {FRONT: self.grace + FRONT_SLACK, CLOSE: CLOSE_LIMIT}
        for stage in (FRONT, CLOSE, POOLS):
            members = [c for c in reversed(children) if getattr(c, "stop_stage", FRONT) == stage]
            waits = [defer.maybeDeferred(c.stopService) for c in members if c.running]
            if not waits:
                continue
            everything = defer.DeferredList(waits, consumeErrors=True)
            if stage not in limits:
                await everything
                continue
            if not await wait_at_most(everything, limits[stage], self.clock):
                log.error("shutdown stage {stage} not finished after {limit}s; going on", stage=stage,
                          limit=limits[stage], event="shutdown")  # fmt: skip
        log.info("stopped", event="shutdown")


class ThreadPoolService(service.Service):
    """Starts and stops one thread pool.

    ``join=False`` is for pools whose work may block for long on the outside world (DNS): their
    threads are daemon threads, and stopping does not wait for a lookup in progress.
    """

    stop_stage = POOLS

    def __init__(self, pool: ThreadPool | FilePool, join: bool = True) -> None:
        self.pool = pool
        self.join = join
        if not join:
            cast(ThreadPool, pool).threadFactory = cast("type[threading.Thread]", _daemon_thread)  # only ever called

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        if self.join:
            self.pool.stop()
        else:
            threading.Thread(target=self.pool.stop, name=f"{self.pool.name}-stop", daemon=True).start()


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


class SessionDrain(service.Service):
    """At shutdown: SMTP sessions in progress may finish within ``grace``, then get 421 4.3.2.

    ``factories`` are SMTP server factories (they track their connections). Once every session
    is gone (or ``grace`` plus a bound for the close has passed) the stop is done.
    """

    def __init__(self, factories: list[Any], clock: Any, grace: float) -> None:
        self.factories = factories
        self.clock = clock
        self.grace = grace

    def _open(self) -> list[Any]:
        return [p for f in self.factories for p in list(f.sessions)]

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        if not self._open():
            return None
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        gone: defer.Deferred[None] = defer.Deferred()

        def emptied() -> None:
            if not gone.called and not self._open():
                gone.callback(None)

        for factory in self.factories:
            factory.on_empty = emptied
        if await wait_at_most(gone, self.grace, self.clock):
            return
        sessions = self._open()
        log.info("closing {n} SMTP session(s) still open: 421 4.3.2", n=len(sessions), event="shutdown")
        for protocol in sessions:
            protocol.shut_down()
        if not await wait_at_most(gone, 2.0, self.clock):
            for protocol in self._open():
                protocol.abort_now()


class SignalGuard(service.Service):
    """Makes a second SIGTERM or SIGINT during the stop harmless (Twisted's own handler would
    call ``reactor.stop()`` again and log ReactorNotRunning); the first one stops as usual."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stopping = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.reactor.addSystemEventTrigger("before", "shutdown", self._mark)
        self.reactor.callWhenRunning(self._install)

    def _mark(self) -> None:
        self.stopping = True

    def _install(self) -> None:
        for number, original in ((signal.SIGTERM, self.reactor.sigTerm), (signal.SIGINT, self.reactor.sigInt)):
            if signal.getsignal(number) in (signal.SIG_IGN, None):
                continue
            signal.signal(number, self._handler(original))

    def _handler(self, original: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
        def handle(number: int, frame: Any) -> None:
            if self.stopping:
                self.reactor.callFromThread(log.info, "signal {signal} while stopping: already stopping",
                                            signal=signal.Signals(number).name, event="shutdown")  # fmt: skip
                return
            self.stopping = True
            original(number, frame)

        return handle
