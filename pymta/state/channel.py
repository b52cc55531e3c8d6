"""A Redis Pub/Sub subscription kept open for the life of a node.

Pub/Sub needs a connection of its own (a subscribed connection answers no other command), so
:class:`Subscription` holds one, apart from the node's command connection. When it is lost
(Redis restarted, a network cut) it is opened again after a delay that doubles from ``initial``
up to ``most`` seconds, reset once subscribed; each (re)subscription calls ``on_ready`` so the
owner catches up with what was published while nobody listened. Connecting and subscribing are
each bounded by ``timeout``; a failure is logged and retried, never raised to the owner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="pymta.state.channel")

# open(on_message, on_lost) -> Deferred of a subscriber (``subscribe(channels)``, ``disconnect()``)
Opener = Callable[[Callable[[str, str], Any], Callable[[], Any]], defer.Deferred[Any]]


class Subscription:
    """``channel`` on the connections ``open`` makes; ``on_message(channel, message)`` per message."""

    def __init__(
        self,
        clock: Any,
        open: Opener,
        channel: str,
        on_message: Callable[[str, str], Any],
        on_ready: Callable[[], Any],
        timeout: float = 2.0,
        initial: float = 0.5,
        most: float = 30.0,
    ) -> None:
        self.clock = clock
        self.open = open
        self.channel = channel
        self.on_message = on_message
        self.on_ready = on_ready
        self.timeout = timeout
        self.initial = initial
        self.most = most
        self.subscribed = False
        self.subscriptions = 0  # times subscribed (the first one and every reconnection)
        self._conn: Any = None
        self._retry: Any = None
        self._failures = 0
        self._stopped = True

    def start(self) -> None:
        self._stopped = False
        self._attempt()

    def delay(self) -> float:
        """Seconds before the next attempt: ``initial`` after a loss or a first failure, doubled
        after each further failure in a row, at most ``most``."""
        return cast(float, min(self.most, self.initial * 2 ** min(max(0, self._failures - 1), 32)))

    @defer.inlineCallbacks
    def _attempt(self) -> Any:
        self._retry = None
        if self._stopped:
            return
        conn = None
        try:
            d = self.open(self._message, self._lost)
            d.addTimeout(self.timeout, self.clock)
            conn = yield d
            if self._stopped:
                raise ConnectionError("stopped")
            self._conn = conn
            d = defer.maybeDeferred(conn.subscribe, self.channel)
            d.addTimeout(self.timeout, self.clock)
            yield d
        except Exception as e:
            self._conn = None
            if conn is not None:
                self._close(conn)
            if not self._stopped:
                self._failures += 1
                log.info("cannot subscribe to {channel}, trying again in {delay:.1f}s: {why}", channel=self.channel,
                         delay=self.delay(), why=f"{type(e).__name__}: {e}"[:200], event="cluster_channel_down")  # fmt: skip
                self._later()
            return
        self._failures = 0
        self.subscribed = True
        self.subscriptions += 1
        log.info("subscribed to {channel}", channel=self.channel, event="cluster_channel_up")
        try:
            self.on_ready()
        except Exception:
            log.failure("catching up after subscribing to {channel}", channel=self.channel)

    def _later(self) -> None:
        if self._retry is None and not self._stopped:
            self._retry = self.clock.callLater(self.delay(), self._attempt)

    def _message(self, channel: str, message: str) -> None:
        try:
            self.on_message(channel, message)
        except Exception:
            log.failure("handling a message on {channel}", channel=channel)

    def _lost(self) -> None:
        was = self.subscribed
        self.subscribed = False
        self._conn = None
        if was and not self._stopped:
            log.info("subscription to {channel} lost", channel=self.channel, event="cluster_channel_down")
            self._failures = 0
            self._later()

    @staticmethod
    def _close(conn: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(conn.disconnect).addErrback(lambda _: None)

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening; a Deferred that fires once the connection is closed."""
        self._stopped = True
        self.subscribed = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        conn, self._conn = self._conn, None
        return self._close(conn) if conn is not None else defer.succeed(None)
