"""HTTP bodies for twisted.web's client: a request body sent in one write, and a response body read
into bytes, bounded in size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body in one write (FileBodyProducer and treq's default wait for a cooperator tick)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[Any]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class LimitedBody(Protocol):
    """Collects a response body into ``done``; gives up (``error``) past ``limit`` bytes or when the
    body is cut short. ``what`` names the body in the error text."""

    def __init__(self, done: defer.Deferred[Any], limit: int, error: Callable[[str], Exception], what: str) -> None:
        self.done = done
        self.limit = limit
        self.error = error
        self.what = what
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(self.error(f"{self.what} larger than {self.limit} bytes"))
            cast(IPushProducer, self.transport).stopProducing()  # a response body's transport is its producer
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(self.error(f"{self.what} incomplete: {reason.getErrorMessage()}"))
