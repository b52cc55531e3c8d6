"""Local delivery over LMTP (RFC 2033) to a mailbox server such as Dovecot: per-recipient results.

``[mailbox] transport = "lmtp:unix:/run/dovecot/lmtp"`` or ``"lmtp:tcp:127.0.0.1:24"``. One
transaction per message: LHLO once per connection, MAIL, one RCPT per recipient, DATA, then one
reply per accepted recipient after the final dot — a 4xx for one recipient defers only that one.
Idle connections are kept for reuse (bounded in number and idle time); every reply is waited for
at most the configured timeout, and a connection lost after the final dot defers the recipients
whose replies had not come (a duplicate is better than a loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from pymta.config import parse_lmtp_transport
from pymta.envelope import DEFERRED, DELIVERED, FAILED, DeliveryResult, Envelope, Recipient
from pymta.interfaces import IDeliveryAgent
from pymta.smtp.client import (
    ClientTimeouts,
    SessionRefused,
    SMTPClientProtocol,
    mail_command,
    quit_session,
    transact,
)
from pymta.smtp.content import encode_data
from pymta.smtp.replies import Reply

log = Logger(namespace="pymta.inbound.lmtp")


def lmtp_timeouts(timeout: float) -> ClientTimeouts:
    """Every stage waits ``timeout``; connecting at most 30 s (a local server answers at once or not at all)."""
    t = timeout
    return ClientTimeouts(connect=min(t, 30.0), greeting=t, ehlo=t, starttls=t, mail=t, rcpt=t, data=t,
                          data_block=t, data_end=t, rset=t, quit=min(t, 10.0))  # fmt: skip


def _result(address: str, reply: Reply, where: str) -> DeliveryResult:
    if 200 <= reply.code < 300:
        status = DELIVERED
    elif 500 <= reply.code < 600:
        status = FAILED
    else:
        status = DEFERRED
    enhanced = reply.enhanced or f"{reply.code // 100}.0.0"
    return DeliveryResult(address, status, reply.code, enhanced, reply.text, remote_mta=where)


@implementer(IDeliveryAgent)
class LMTPDeliveryAgent:
    """Hands local recipients to an LMTP server; at most ``max_connections`` at once, idle ones reused
    for ``idle_timeout`` seconds and at most ``max_messages`` transactions each."""

    def __init__(
        self,
        transport: str,
        hostname: str,
        reactor: Any,
        timeout: float = 300.0,
        max_connections: int = 10,
        idle_timeout: float = 30.0,
        max_messages: int = 1000,
        endpoint_factory: Callable[[], Any] | None = None,
    ) -> None:
        where = parse_lmtp_transport(transport)
        if where is None:
            raise ValueError(f"not an LMTP transport: {transport!r}")
        self.transport = transport
        self.hostname = hostname
        self.reactor = reactor
        self.timeouts = lmtp_timeouts(timeout)
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        kind, host, port = where
        self.where = host if kind == "unix" else f"{host}:{port}"
        self._endpoint_factory = endpoint_factory or (lambda: self._endpoint(kind, host, port))
        self._slots = defer.DeferredSemaphore(max_connections)
        self._idle: list[tuple[SMTPClientProtocol, Any, int]] = []  # (connection, idle timer, transactions)
        self._busy: set[SMTPClientProtocol] = set()

    def _endpoint(self, kind: str, host: str, port: int) -> Any:
        timeout = self.timeouts.connect
        if kind == "unix":
            return UNIXClientEndpoint(self.reactor, host, timeout=timeout)
        cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        return cls(self.reactor, host, port, timeout=timeout)

    def deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> defer.Deferred[Any]:
        return self._slots.run(self._deliver, envelope, recipients, body)

    @defer.inlineCallbacks
    def _deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> Any:
        try:
            proto, used = yield self._connection()
        except Exception as e:
            why = _describe(e)
            log.warn("LMTP server {where} unavailable: {why}", where=self.where, why=why, qid=envelope.qid,
                     code=451, enhanced="4.4.1", event="lmtp_unavailable")  # fmt: skip
            return [DeliveryResult(r.address, DEFERRED, 451, "4.4.1", f"LMTP server {self.where}: {why}",
                                   remote_mta=self.where) for r in recipients]  # fmt: skip
        self._busy.add(proto)
        try:
            outcome = yield transact(
                proto, mail_command(envelope.sender, body, proto.extensions, envelope.smtputf8), [f"RCPT TO:<{r.address}>" for r in recipients],
                encode_data(body), self.timeouts, lmtp=True,
            )  # fmt: skip
        except Exception as e:
            self._busy.discard(proto)
            proto.abort()
            why = _describe(e)
            log.warn("LMTP delivery of {qid} to {where} deferred: {why}", qid=envelope.qid, where=self.where, why=why,
                     code=451, enhanced="4.4.2", event="lmtp_error")  # fmt: skip
            return [DeliveryResult(r.address, DEFERRED, 451, "4.4.2", f"LMTP session with {self.where}: {why}",
                                   remote_mta=self.where) for r in recipients]  # fmt: skip
        self._busy.discard(proto)
        results = self._results(recipients, outcome)
        if outcome.lost_after_data or proto.is_lost or (outcome.data is not None and outcome.data.code == 421):
            proto.abort()
        else:
            self._release(proto, used + 1)
        return results

    def _results(self, recipients: list[Recipient], outcome: Any) -> list[DeliveryResult]:
        out = []
        each = iter(outcome.data_each)
        for i, rcpt in enumerate(recipients):
            if outcome.mail.code != 250:
                out.append(_result(rcpt.address, outcome.mail, self.where))
                continue
            reply = outcome.rcpt[i] if i < len(outcome.rcpt) else Reply(451, "4.4.2", "No reply to RCPT")
            if reply.code not in (250, 251):
                out.append(_result(rcpt.address, reply, self.where))
                continue
            final = next(each, None)
            if final is None and outcome.data is not None and not outcome.lost_after_data:
                final = outcome.data  # DATA itself refused (no 354)
            if final is None:
                # The final dot was sent but this recipient's reply never came: it may have been
                # delivered, so another attempt may duplicate it; that beats losing it.
                final = Reply(451, "4.4.2", "Connection lost after the message data (may be a duplicate)")
            out.append(_result(rcpt.address, final, self.where))
        for r in out:
            log.info("LMTP {rcpt}: {code} {enhanced} {text}", rcpt=r.address, code=r.code, enhanced=r.enhanced,
                     text=r.text, where=self.where, event="lmtp_result")  # fmt: skip
        return out

    # -- connections ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _connection(self) -> Any:
        """An idle connection still open, else a new one greeted and LHLO'd; (protocol, transactions)."""
        while self._idle:
            proto, timer, used = self._idle.pop()
            if timer.active():
                timer.cancel()
            if not proto.is_lost:
                return proto, used
        proto = SMTPClientProtocol(self.reactor)
        d = self._endpoint_factory().connect(Factory.forProtocol(lambda: proto))
        d.addTimeout(self.timeouts.connect, self.reactor)
        yield d
        try:
            greeting = yield proto.expect(self.timeouts.greeting)
            if greeting.code != 220:
                raise SessionRefused(greeting, "greeting")
            yield proto.hello(self.hostname, self.timeouts, verb="LHLO")
        except Exception:
            proto.abort()
            raise
        return proto, 0

    def _release(self, proto: SMTPClientProtocol, used: int) -> None:
        if used >= self.max_messages or self.idle_timeout <= 0:
            quit_session(proto, self.timeouts)
            return
        entry: list[Any] = []

        def expire() -> None:
            if entry and entry[0] in self._idle:
                self._idle.remove(entry[0])
            quit_session(proto, self.timeouts)

        entry.append((proto, self.reactor.callLater(self.idle_timeout, expire), used))
        self._idle.append(entry[0])

    def close_idle(self) -> defer.Deferred[Any]:
        """QUIT every idle connection (at shutdown); fires when they are gone."""
        idle, self._idle = self._idle, []
        waits = []
        for proto, timer, _ in idle:
            if timer.active():
                timer.cancel()
            waits.append(quit_session(proto, self.timeouts))
        return defer.DeferredList(waits, consumeErrors=True)

    def abort_all(self) -> None:
        for proto in list(self._busy):
            proto.abort()


def _describe(e: Exception) -> str:
    if isinstance(e, defer.TimeoutError | error.TimeoutError):
        return "timed out"
    if isinstance(e, SessionRefused):
        return str(e)
    return str(e) or type(e).__name__
