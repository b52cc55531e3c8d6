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
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.smtp.replies import Reply, parse_reply_lines
from pymta.smtp.sockets import set_nodelay

log = Logger(namespace="pymta.smtp.client")

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


@dataclass
class ClientTimeouts:
    """RFC 5321 §4.5.3.2 client timeouts (seconds)."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0
    rset: float = 60.0
    quit: float = 10.0


class SMTPProtocolError(Exception):
    """The server said something that is not SMTP."""


class ReplyTimeout(Exception):
    """No (complete) reply in time."""


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


def encode_data(body: bytes) -> bytes:
    """The DATA payload: CRLF line ends everywhere, dot-stuffed, terminated by ``CRLF.CRLF``."""
    data = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def xtext_encode(text: str) -> str:
    """RFC 3461 xtext."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in text
    )


class SMTPClientProtocol(Protocol):
    """One client connection; replies are handed out in order to :meth:`expect` callers."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._buffer = b""
        self._lines: list[bytes] = []
        self._waiting: deque[tuple[defer.Deferred, Any]] = deque()
        self._replies: deque[Reply] = deque()
        self.connected_d: defer.Deferred = defer.Deferred()
        self.lost_d: defer.Deferred = defer.Deferred()  # fires when the connection is gone
        self.lost_reason: Failure | None = None
        self.extensions = Extensions()
        self.tls: str | None = None

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        if not self.connected_d.called:
            self.connected_d.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost_reason = reason if reason is not None else Failure(error.ConnectionDone())
        if not self.lost_d.called:
            self.lost_d.callback(None)
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
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None and not self.is_lost:
            self.transport.abortConnection()

    # -- replies ------------------------------------------------------------------------------

    def expect(self, timeout: float) -> defer.Deferred:
        """A Deferred for the next reply (a :class:`Reply`), failing on timeout or connection loss."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self.is_lost:
            return defer.fail(self.lost_reason)
        d: defer.Deferred = defer.Deferred()

        def timed_out() -> None:
            self._waiting = deque(w for w in self._waiting if w[0] is not d)
            d.errback(ReplyTimeout(f"no reply within {timeout:g}s"))
            self.abort()

        self._waiting.append((d, self.clock.callLater(timeout, timed_out)))
        return d

    def expect_many(self, count: int, timeout: float) -> defer.Deferred:
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

    def command(self, line: str, timeout: float) -> defer.Deferred:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.expect(timeout)

    @defer.inlineCallbacks
    def hello(self, name: str, timeouts: ClientTimeouts):
        """EHLO, falling back to HELO on a 5xx; returns the positive reply or raises with the negative."""
        reply = yield self.command(f"EHLO {name}", timeouts.ehlo)
        if reply.code == 250:
            self.extensions = Extensions.from_reply(reply)
            return reply
        if 500 <= reply.code < 600:
            reply = yield self.command(f"HELO {name}", timeouts.ehlo)
            if reply.code == 250:
                self.extensions = Extensions()
                return reply
        raise SessionRefused(reply, "HELO")

    @defer.inlineCallbacks
    def starttls(self, context: Any, name: str, timeouts: ClientTimeouts):
        reply = yield self.command("STARTTLS", timeouts.starttls)
        if reply.code != 220:
            raise TLSUnavailable(f"STARTTLS refused: {reply}")
        self.transport.startTLS(context)
        reply = yield self.command(f"EHLO {name}", timeouts.ehlo)  # the handshake happens here
        if reply.code != 250:
            raise SessionRefused(reply, "EHLO after STARTTLS")
        self.extensions = Extensions.from_reply(reply)
        handle = getattr(self.transport, "getHandle", lambda: None)()
        try:
            self.tls = f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
        except Exception:
            self.tls = "TLS"
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
    """Replies of one transaction: per recipient (in order) and the final DATA reply."""

    mail: Reply
    rcpt: list[Reply]
    data: Reply | None
    lost_after_data: bool = False


@defer.inlineCallbacks
def transact(
    proto: SMTPClientProtocol,
    mail_from: str,
    rcpts: list[str],
    payload: bytes,
    timeouts: ClientTimeouts,
):
    """One transaction: ``mail_from`` and ``rcpts`` are whole command lines; ``payload`` is the
    encoded data (see :func:`encode_data`). Pipelined when the server offers PIPELINING."""
    pipelining = proto.extensions.has("PIPELINING")
    if pipelining:
        proto.send(("\r\n".join([mail_from, *rcpts, "DATA"]) + "\r\n").encode("utf-8"))
        mail = yield proto.expect(timeouts.mail)
        rcpt_replies = []
        for _ in rcpts:
            rcpt_replies.append((yield proto.expect(timeouts.rcpt)))
        data_reply = yield proto.expect(timeouts.data_init)
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
        data_reply = yield proto.command("DATA", timeouts.data_init)
    if mail.code != 250 or not any(r.code in (250, 251) for r in rcpt_replies):
        if data_reply.code == 354:  # the server wants data nobody can send: end it empty, then reset
            proto.send(b".\r\n")
            yield proto.expect(timeouts.data_done)
        yield _rset(proto, timeouts)
        return TransactionResult(mail, rcpt_replies, None)
    if data_reply.code != 354:
        return TransactionResult(mail, rcpt_replies, data_reply)
    proto.send(payload)
    try:
        final = yield proto.expect(timeouts.data_done)
    except (error.ConnectionLost, error.ConnectionDone, ReplyTimeout, SMTPProtocolError):
        return TransactionResult(mail, rcpt_replies, None, lost_after_data=True)
    return TransactionResult(mail, rcpt_replies, final)


@defer.inlineCallbacks
def _rset(proto: SMTPClientProtocol, timeouts: ClientTimeouts):
    try:
        yield proto.command("RSET", timeouts.rset)
    except Exception:
        proto.abort()


def quit_session(proto: SMTPClientProtocol, timeouts: ClientTimeouts) -> defer.Deferred:
    """Say QUIT politely, then close whatever the answer; fires when the connection is gone."""
    if proto.is_lost:
        return defer.succeed(None)
    d = proto.command("QUIT", timeouts.quit)
    d.addBoth(lambda _: proto.transport.loseConnection() if proto.transport is not None else None)
    return proto.lost_d
