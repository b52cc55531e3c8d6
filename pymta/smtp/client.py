"""The ESMTP client, ours: reply parsing, EHLO/HELO, STARTTLS, pipelined transactions, DSN and
SIZE/8BITMIME/SMTPUTF8 parameters, per-stage timeouts, and correct dot-stuffing.

:class:`SMTPClientProtocol` is driven by Deferreds (one per expected reply); the delivery agent
runs the dialogue. Message data is encoded with bytes operations over the whole body: bare CR
and bare LF become CRLF, a leading dot on any line is doubled, ``CRLF.CRLF`` ends it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pymta.smtp.replies import Reply, parse_reply_lines
from pymta.smtp.sockets import set_nodelay, write_now
from pymta.smtp.syntax import xtext_encode
from pymta.tls import describe_tls

log = Logger(namespace="pymta.smtp.client")

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
DATA_CHUNK = 65536  # message data is handed to the transport in pieces this large, as it takes them


@dataclass(frozen=True)
class ClientTimeouts:
    """RFC 5321 §4.5.3.2 client timeouts (seconds), one per stage.

    ``data`` waits for the 354 after DATA; ``data_block`` bounds each stretch without progress while
    the message is sent (a remote that stops reading is dropped after it, as Postfix's
    ``smtp_data_xfer_timeout``); ``data_end`` waits for the reply after the final dot.
    """

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 60.0
    quit: float = 10.0


class SMTPProtocolError(Exception):
    """The server said something that is not SMTP."""


class ReplyTimeout(Exception):
    """No (complete) reply in time."""


class DataStalled(Exception):
    """The message data could not all be sent: the remote stopped taking it, or the connection went."""


@implementer(IPushProducer)
class _DataSender:
    """Writes message data as the transport takes it (a streaming producer); the block timer runs
    while the transport holds us paused, and the whole payload counts as sent only once the
    transport has taken it all (not paused after the last piece)."""

    def __init__(self, proto: SMTPClientProtocol, payload: bytes, block_timeout: float) -> None:
        self.proto = proto
        self.payload = payload
        self.block_timeout = block_timeout
        self.offset = 0
        self.paused = False
        self.timer: Any = None
        self.done: defer.Deferred[Any] = defer.Deferred()

    def start(self) -> defer.Deferred[Any]:
        self.proto.transport.registerProducer(self, True)
        self._pump()
        return self.done

    def _pump(self) -> None:
        while not self.paused and not self.done.called and self.offset < len(self.payload):
            if self.proto.is_lost:
                return self.lost()
            chunk = self.payload[self.offset : self.offset + DATA_CHUNK]
            self.offset += len(chunk)
            write_now(self.proto.transport, chunk)
        if not self.paused and not self.done.called and self.offset >= len(self.payload):
            self._finish(None)

    def _finish(self, failure: Exception | None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.done.called:
            return
        if self.proto.transport is not None and not self.proto.is_lost:
            self.proto.transport.unregisterProducer()
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)

    def pauseProducing(self) -> None:
        self.paused = True
        if self.timer is None and not self.done.called:
            self.timer = self.proto.clock.callLater(self.block_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self.paused = False
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self._pump()

    def stopProducing(self) -> None:
        self.lost()

    def lost(self) -> None:
        written = f"{self.offset} of {len(self.payload)} bytes written"
        self._finish(DataStalled(f"connection lost while sending message data ({written})"))

    def _stalled(self) -> None:
        self.timer = None
        why = f"remote took no message data for {self.block_timeout:g}s ({self.offset} of {len(self.payload)} bytes written)"
        self._finish(DataStalled(why))
        self.proto.abort()


@dataclass
class Extensions:
    """What the server offered in its EHLO reply."""

    esmtp: bool = False
    names: dict[str, str] = field(default_factory=dict)  # keyword -> parameters

    def has(self, name: str) -> bool:
        return name in self.names

    @property
    def size_limit(self) -> int | None:
        value = self.names.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @classmethod
    def from_reply(cls, reply: Reply) -> Extensions:
        names: dict[str, str] = {}
        for line in reply.lines()[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                names[keyword.upper()] = params.strip()
        return cls(esmtp=True, names=names)


def mail_command(sender: str, body: bytes, ext: Extensions, smtputf8: bool = False, ret: str | None = None,
                 envid: str | None = None, requiretls: bool = False) -> str:
    """``MAIL FROM:<sender>`` with the parameters the server offers and the message needs."""
    params = []
    if ext.has("SIZE"):
        params.append(f"SIZE={len(body)}")
    if not body.isascii() and ext.has("8BITMIME"):
        params.append("BODY=8BITMIME")
    if ext.has("SMTPUTF8") and (smtputf8 or not sender.isascii()):
        params.append("SMTPUTF8")
    if requiretls and ext.has("REQUIRETLS"):  # RFC 8689: passed on only to a hop that offers it
        params.append("REQUIRETLS")
    if ext.has("DSN"):
        if ret:
            params.append(f"RET={ret}")
        if envid:
            params.append(f"ENVID={xtext_encode(envid)}")
    return " ".join([f"MAIL FROM:<{sender}>", *params])


class SMTPClientProtocol(Protocol):
    """One client connection; replies are handed out in order to :meth:`expect` callers."""

    # Twisted's interfaces are zope Interfaces, whose methods mypy reads without ``self``.
    transport: Any

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._buffer = b""
        self._lines: list[bytes] = []
        self._waiting: deque[tuple[defer.Deferred[Any], Any]] = deque()
        self._replies: deque[Reply] = deque()
        self.connected_d: defer.Deferred[Any] = defer.Deferred()
        self.lost_d: defer.Deferred[Any] = defer.Deferred()  # fires when the connection is gone
        self.lost_reason: Failure | None = None
        self.extensions = Extensions()
        self.tls: str | None = None
        self.tls_verified: str | None = None  # the name the server's certificate was verified for
        self._sender: _DataSender | None = None

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        if not self.connected_d.called:
            self.connected_d.callback(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost_reason = reason if reason is not None else Failure(error.ConnectionDone())
        if not self.lost_d.called:
            self.lost_d.callback(None)
        if self._sender is not None:
            self._sender.lost()
        waiting, self._waiting = self._waiting, deque()
        for d, call in waiting:
            if call is not None and call.active():
                call.cancel()
            d.errback(reason if reason is not None else Failure(error.ConnectionLost()))

    @property
    def is_lost(self) -> bool:
        return self.lost_reason is not None

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.is_lost:
            write_now(self.transport, data)

    def abort(self) -> None:
        if self.transport is not None and not self.is_lost:
            self.transport.abortConnection()

    def send_data(self, payload: bytes, block_timeout: float) -> defer.Deferred[Any]:
        """Send the encoded message data with flow control; fires once the transport has taken it
        all, fails with :class:`DataStalled` (the connection aborted) when the remote takes none
        for ``block_timeout`` seconds or the connection is lost."""
        if self.is_lost:
            return defer.fail(DataStalled("connection lost before the message data"))
        sender = self._sender = _DataSender(self, payload, block_timeout)

        def forget(result: Any) -> Any:
            self._sender = None
            return result

        return sender.start().addBoth(forget)

    # -- replies ------------------------------------------------------------------------------

    def expect(self, timeout: float) -> defer.Deferred[Any]:
        """A Deferred for the next reply (a :class:`Reply`), failing on timeout or connection loss."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self.is_lost:
            return defer.fail(self.lost_reason)
        d: defer.Deferred[Any] = defer.Deferred()

        def timed_out() -> None:
            self._waiting = deque(w for w in self._waiting if w[0] is not d)
            d.errback(ReplyTimeout(f"no reply within {timeout:g}s"))
            self.abort()

        self._waiting.append((d, self.clock.callLater(timeout, timed_out)))
        return d

    def expect_many(self, count: int, timeout: float) -> defer.Deferred[Any]:
        """Replies to ``count`` pipelined commands, in order (a list)."""
        return defer.gatherResults([self.expect(timeout) for _ in range(count)], consumeErrors=True)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            lf = self._buffer.find(b"\n")
            if lf < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._protocol_error("reply line too long")
                return
            line, self._buffer = self._buffer[:lf].rstrip(b"\r"), self._buffer[lf + 1 :]
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in (b" ", b"-")):
                self._protocol_error(f"not an SMTP reply: {line[:60]!r}")
                return
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                self._protocol_error("reply has too many lines")
                return
            if len(line) == 3 or line[3:4] == b" ":
                lines, self._lines = self._lines, []
                self._deliver(parse_reply_lines(lines))

    def _deliver(self, reply: Reply) -> None:
        if self._waiting:
            d, call = self._waiting.popleft()
            if call is not None and call.active():
                call.cancel()
            d.callback(reply)
        else:
            self._replies.append(reply)

    def _protocol_error(self, why: str) -> None:
        self._buffer = b""
        waiting, self._waiting = self._waiting, deque()
        for d, call in waiting:
            if call is not None and call.active():
                call.cancel()
            d.errback(SMTPProtocolError(why))
        self.abort()

    # -- commands -----------------------------------------------------------------------------

    def command(self, line: str, timeout: float) -> defer.Deferred[Any]:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.expect(timeout)

    @defer.inlineCallbacks
    def hello(self, name: str, timeouts: ClientTimeouts, verb: str = "EHLO") -> Any:
        """EHLO (or LMTP's LHLO, which has no fallback), falling back to HELO on a 5xx; returns the
        positive reply or raises with the negative."""
        reply = yield self.command(f"{verb} {name}", timeouts.ehlo)
        if reply.code == 250:
            self.extensions = Extensions.from_reply(reply)
            return reply
        if 500 <= reply.code < 600 and verb == "EHLO":
            reply = yield self.command(f"HELO {name}", timeouts.ehlo)
            if reply.code == 250:
                self.extensions = Extensions()
                return reply
        raise SessionRefused(reply, "HELO")

    @defer.inlineCallbacks
    def starttls(self, context: Any, name: str, timeouts: ClientTimeouts, verified_for: str | None = None) -> Any:
        """STARTTLS, the handshake and EHLO again; ``verified_for``: the name ``context`` verifies
        the certificate against (recorded once the handshake has succeeded)."""
        reply = yield self.command("STARTTLS", timeouts.starttls)
        if reply.code != 220:
            raise TLSUnavailable(f"STARTTLS refused: {reply}")
        self.transport.startTLS(context)
        reply = yield self.command(f"EHLO {name}", timeouts.ehlo)  # the handshake happens here
        if reply.code != 250:
            raise SessionRefused(reply, "EHLO after STARTTLS")
        self.extensions = Extensions.from_reply(reply)
        self.tls_verified = verified_for
        self.tls = describe_tls(self.transport) or "TLS"
        return reply


class SessionRefused(Exception):
    """The server refused the session (greeting, EHLO/HELO): try the next host."""

    def __init__(self, reply: Reply, stage: str) -> None:
        super().__init__(f"{stage}: {reply}")
        self.reply = reply
        self.stage = stage


class TLSUnavailable(Exception):
    """STARTTLS was refused or its handshake failed."""


@dataclass
class TransactionResult:
    """Replies of one transaction: per recipient (in order) and the final DATA reply (LMTP: the
    first of ``data_each``, one per accepted recipient in RCPT order, RFC 2033 §4.2)."""

    mail: Reply
    rcpt: list[Reply]
    data: Reply | None
    lost_after_data: bool = False
    data_each: list[Reply] = field(default_factory=list)


@defer.inlineCallbacks
def transact(
    proto: SMTPClientProtocol,
    mail_from: str,
    rcpts: list[str],
    payload: bytes,
    timeouts: ClientTimeouts,
    lmtp: bool = False,
) -> Any:
    """One transaction: ``mail_from`` and ``rcpts`` are whole command lines; ``payload`` is the
    encoded data (see :func:`pymta.smtp.content.encode_data`). Pipelined when the server offers PIPELINING.
    ``lmtp``: after the final dot, one reply per accepted recipient (``data_each``); a connection
    lost part way leaves the rest out of ``data_each`` with ``lost_after_data`` set."""
    pipelining = proto.extensions.has("PIPELINING")
    if pipelining:
        proto.send(("\r\n".join([mail_from, *rcpts, "DATA"]) + "\r\n").encode("utf-8"))
        mail = yield proto.expect(timeouts.mail)
        rcpt_replies = []
        for _ in rcpts:
            rcpt_replies.append((yield proto.expect(timeouts.rcpt)))
        data_reply = yield proto.expect(timeouts.data)
    else:
        mail = yield proto.command(mail_from, timeouts.mail)
        if mail.code != 250:
            return TransactionResult(mail, [], None)
        rcpt_replies = []
        for line in rcpts:
            rcpt_replies.append((yield proto.command(line, timeouts.rcpt)))
        if not any(r.code in (250, 251) for r in rcpt_replies):
            yield _rset(proto, timeouts)
            return TransactionResult(mail, rcpt_replies, None)
        data_reply = yield proto.command("DATA", timeouts.data)
    if mail.code != 250 or not any(r.code in (250, 251) for r in rcpt_replies):
        if data_reply.code == 354:  # the server wants data nobody can send: end it empty, then reset
            proto.send(b".\r\n")
            yield proto.expect(timeouts.data_end)
        yield _rset(proto, timeouts)
        return TransactionResult(mail, rcpt_replies, None)
    if data_reply.code != 354:
        return TransactionResult(mail, rcpt_replies, data_reply)
    try:
        yield proto.send_data(payload, timeouts.data_block)
    except DataStalled as e:  # the final dot never left: no risk of a duplicate
        log.info("sending message data stopped: {why}", why=str(e))
        return TransactionResult(mail, rcpt_replies, Reply(451, "4.4.2", f"Message data not sent: {e}"))
    expected = sum(r.code in (250, 251) for r in rcpt_replies) if lmtp else 1
    each: list[Reply] = []
    try:
        while len(each) < expected:
            each.append((yield proto.expect(timeouts.data_end)))
    except (error.ConnectionLost, error.ConnectionDone, ReplyTimeout, SMTPProtocolError):
        return TransactionResult(mail, rcpt_replies, each[0] if each else None, lost_after_data=True, data_each=each)
    return TransactionResult(mail, rcpt_replies, each[0], data_each=each)


@defer.inlineCallbacks
def _rset(proto: SMTPClientProtocol, timeouts: ClientTimeouts) -> Any:
    try:
        yield proto.command("RSET", timeouts.rset)
    except Exception:
        proto.abort()


def quit_session(proto: SMTPClientProtocol, timeouts: ClientTimeouts) -> defer.Deferred[Any]:
    """Say QUIT politely, then close whatever the answer; fires when the connection is gone."""
    if proto.is_lost:
        return defer.succeed(None)
    d = proto.command("QUIT", timeouts.quit)

    def close(_: Any) -> None:
        if proto.transport is not None and not proto.is_lost:
            proto.transport.loseConnection()
            # A remote that takes no more data would keep a closing connection open: bound it.
            call = proto.clock.callLater(timeouts.quit, proto.abort)
            proto.lost_d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])

    d.addBoth(close)
    return proto.lost_d
