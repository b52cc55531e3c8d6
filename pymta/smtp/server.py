"""The ESMTP server state machine, byte-level on Twisted's Protocol (not twisted.mail).

Every decision is asked of an :class:`pymta.interfaces.ISMTPServerDelegate`; this module knows
nothing of queues, policy or DNS. Input is handled in bytes: commands are split at LF, message
data is scanned per chunk with ``bytes.find`` and compiled regular expressions, end-of-data is
``CRLF.CRLF`` only, and dot-unstuffing is one ``bytes.replace``.

Replies (every one with an enhanced status code except the 220 greeting and the EHLO/HELO 250):

====================================  ===========================================================
500 5.5.2                             unknown command, NUL in a command, command line over 512 octets
501 5.5.2 / 5.5.4 / 5.1.3 / 5.1.7     syntax: command, arguments, recipient, sender address
503 5.5.1                             bad sequence (MAIL before EHLO, RCPT before MAIL, DATA
                                      without recipients, DATA after BDAT, second STARTTLS ...)
552 5.3.4                             MAIL SIZE= over the limit; message over the limit
553 5.6.7                             non-ASCII address without SMTPUTF8
555 5.5.4                             unknown or malformed MAIL/RCPT parameter
452 4.5.3                             too many recipients
550 5.6.0                             message refused at end of data: bare CR or LF, NUL, or a
                                      line over 1000 octets (the server stays in DATA until the
                                      real end of data, so nothing in the body is read as a command)
554 5.5.1                             spoke before the greeting (greet_pause)
421 4.4.2 / 4.7.0                     timeout (command line, data inactivity or rate, session time)
                                      / too many errors or connections, then the connection is closed
451 4.3.0                             a local error answering a command (logged, never shown)
====================================  ===========================================================

BDAT content follows the same content rules as DATA (no bare CR or LF, no NUL, lines at most
1000 octets): BINARYMIME is not offered, so BDAT carries the same text a DATA would.

Time limits a client cannot reset by trickling: ``command_timeout`` is a deadline for a whole
command line, counted from the moment the server is ready for it (bytes of a partial line do not
extend it); ``data_timeout`` bounds inactivity in DATA/BDAT content and, after the first
``DATA_RATE_GRACE`` seconds of a message, the client must keep up ``min_data_rate`` on average;
``max_session_time`` caps the whole connection. Waiting on our own work (a delegate's answer)
never counts against the client.

Back-pressure: while an answer is pending (the delegate is working, or the client does not read
what we send), at most ``max_pending_input`` octets beyond what has been handled are held; above
that the transport is paused (``pauseProducing``) until the answer is sent. Input is consumed by
offset into one buffer, so splitting pipelined lines is linear in the input.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pymta.interfaces import ISession
from pymta.smtp import sasl
from pymta.smtp.content import BodyCollector, DataScanner, unstuff
from pymta.smtp.replies import LOCAL_ERROR, OK, SERVICE_CLOSING, SHUTTING_DOWN, TIMEOUT, Reply
from pymta.smtp.sockets import set_nodelay, write_now
from pymta.smtp.syntax import (
    apply_mail_params,
    apply_rcpt_params,
    helo_name,
    parse_params,
    parse_path,
    split_path_and_params,
)
from pymta.tls import describe_tls

log = Logger(namespace="pymta.smtp.server")

# -- limits and session values -----------------------------------------------------------------


@dataclass
class ServerLimits:
    max_message_size: int = 36700160
    max_recipients: int = 1000
    max_errors: int = 10  # unknown/invalid commands before 421 4.7.0 + disconnect
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2 server timeout waiting for a command
    data_timeout: float = 600.0  # inactivity while receiving DATA/BDAT content
    max_command_line: int = 512  # octets incl. CRLF
    greet_pause: float = 0.0  # seconds of silence expected before the greeting (0 = off)
    max_auth_failures: int = 3  # failed AUTH in a row before 421 4.7.0
    min_data_rate: float = 1024.0  # octets/s a DATA/BDAT transfer must average after DATA_RATE_GRACE (0 = off)
    max_session_time: float = 1800.0  # seconds a connection may last at most (0 = no cap)
    max_pending_input: int = 65536  # octets held unhandled while an answer is pending before pausing


@dataclass
class AcceptedRecipient:
    address: str
    params: dict[str, str] = field(default_factory=dict)
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass
class Transaction:
    sender: str  # "" for <>
    params: dict[str, str] = field(default_factory=dict)
    body_type: str = "7BIT"
    smtputf8: bool = False
    declared_size: int | None = None
    ret: str | None = None
    envid: str | None = None
    recipients: list[AcceptedRecipient] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    used_bdat: bool = False


@implementer(ISession)
@dataclass
class Session:
    session_id: str = ""
    peer_address: str = ""
    peer_port: int = 0
    local_address: str = ""
    local_port: int = 0
    helo_name: str | None = None
    esmtp: bool = False
    tls: str | None = None
    auth_user: str | None = None
    transaction: Transaction | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol_name(self) -> str:
        """RFC 3848 ``with`` keyword for the Received header."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")


# -- the protocol --------------------------------------------------------------------------------

_COMMAND, _DATA, _BDAT, _GREET, _AUTH, _CLOSED = range(6)
CLOSE_GRACE = 5.0  # seconds a closing connection may take before it is aborted
DATA_RATE_GRACE = 30.0  # seconds of DATA/BDAT before min_data_rate is enforced
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
DATA_TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")
_EXTENSIONS = ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN")
_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "USER-AGENT:", "HOST:"})


class ConnectionSlots:
    """A cap on the connections open at once, shared by the factories (listeners) given it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)


@implementer(IPushProducer)
class SMTPServerProtocol(Protocol):
    """One SMTP connection; the transport's producer, so a client that does not read what we
    send stops being read from."""

    # Twisted's interfaces are zope Interfaces, whose methods mypy reads without ``self``.
    transport: Any

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.delegate = factory.delegate
        self.limits = factory.limits
        self.clock: Any = factory.clock  # IReactorTime (a zope Interface, as above)
        self.session = Session(session_id=f"{factory.id_prefix}{next(factory.counter):x}")
        self._mode = _GREET
        self._buf = b""
        self._pos = 0  # input before this offset in _buf is handled
        self._reading_paused = False  # the transport is paused: too much unhandled input
        self._output_full = False  # the transport asked us to stop producing output
        self._slot = False  # holds one of the factory's connection slots
        self._producing = False  # registered as the transport's producer
        self._refused = False  # turned away by the connection cap
        self._session_call: Any = None
        self._session_over = False  # max_session_time passed while an answer was pending
        self._data_since: float | None = None  # when this message's DATA/BDAT began
        self._data_octets = 0  # octets received since then
        self._out: list[bytes] = []
        self._waiting = False
        self._errors = 0
        self._auth_failures = 0
        self._timer: Any = None
        self._wait_since = 0.0  # when the client's current deadline began (see _arm_timer)
        self._discard_line = False
        self._tls_pending = False
        self._body: BodyCollector | None = None
        self._scanner: DataScanner | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_failed: Reply | None = None
        self._sasl: sasl.SaslExchange | None = None
        self._shut_down_after_answer = False

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.factory.sessions.add(self)
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.session.peer_address = getattr(peer, "host", "") or ""
        self.session.peer_port = getattr(peer, "port", 0) or 0
        self.session.local_address = getattr(host, "host", "") or ""
        self.session.local_port = getattr(host, "port", 0) or 0
        slots = self.factory.connections
        if slots is not None and not slots.acquire():
            self._mode = _CLOSED  # no delegate call, no session: refused before it began
            self._refused = True
            self._out.append(TOO_MANY_CONNECTIONS.to_bytes())
            log.info("refused connection from {client}: {code} {enhanced} {text}", event="reject", stage="connect",
                     client=self.session.peer_address, code=421, enhanced="4.7.0", text=TOO_MANY_CONNECTIONS.text,
                     active=slots.active, limit=slots.limit)  # fmt: skip
            self._close()
            return
        self._slot = slots is not None
        self.transport.registerProducer(self, True)
        self._producing = True
        if self.limits.max_session_time > 0:
            self._session_call = self.clock.callLater(self.limits.max_session_time, self._session_expired)
        if ISSLTransport.providedBy(self.transport):  # implicit TLS (RFC 8314): no STARTTLS, AUTH offered
            self.session.tls, self._tls_pending = "TLS", True  # the cipher is named at the first command
        self._arm_timer()
        self._ask(self.delegate.connected, (self.session,), self._connected_answer)

    def _connected_answer(self, reply: Reply | None) -> None:
        if reply is not None and not reply.is_positive:
            self._reply(reply, stage="connect")
            self._close()
            return
        pause = self.limits.greet_pause
        if pause > 0 and not self.session.notes.get("trusted"):
            self._greet_call = self.clock.callLater(pause, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        if self._mode == _CLOSED:
            return
        self._mode = _COMMAND
        self._out.append(f"220 {self.factory.hostname} ESMTP pymta\r\n".encode())
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._mode = _CLOSED
        self._cancel_timer()
        for name in ("_abort_call", "_greet_call", "_session_call"):
            call = getattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        if self._slot:
            self._slot = False
            self.factory.connections.release()
        if self._refused:
            return  # refused for the connection cap: the delegate never saw it
        try:
            self.delegate.disconnected(self.session)
        except Exception:
            log.failure("delegate.disconnected failed")
        self.factory.sessions.discard(self)
        if not self.factory.sessions and self.factory.on_empty is not None:
            self.factory.on_empty()

    def _close(self) -> None:
        self._flush()
        self._mode = _CLOSED
        self._cancel_timer()
        if self._producing:  # a registered producer would hold a TLS close until unregistered
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        # A peer that never reads (or a TLS handshake that never completes) cannot hold the
        # connection open: after a grace period it is aborted.
        self._abort_call = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and getattr(self.transport, "connected", True):
            self.transport.abortConnection()

    def shut_down(self) -> None:
        """The server is stopping: 421 4.3.2 and close, right after any answer we still owe."""
        if self._mode == _CLOSED:
            return
        if self._waiting:
            self._shut_down_after_answer = True
            return
        self._reply(SHUTTING_DOWN, stage="shutdown")
        self._close()

    def abort_now(self) -> None:
        """Drop the connection without a word (a peer that does not let us close it)."""
        self._mode = _CLOSED
        self._abort()

    # -- timers -------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """The client's time for what it must send next (a command line, more content) starts now.

        One timer, moved lazily: a new deadline only notes when it started, and the timer is
        moved sooner only when the deadline shrinks; when it fires early it sleeps on."""
        now = self.clock.seconds()
        self._wait_since = now
        due = now + (self.limits.data_timeout if self._mode in (_DATA, _BDAT) else self.limits.command_timeout)
        timer = self._timer
        if timer is None:
            self._timer = self.clock.callLater(due - now, self._timed_out)
        elif due < timer.getTime():
            timer.reset(due - now)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiting:  # our own work is slow, not the client: wait on
            self._arm_timer()
            return
        data = self._mode in (_DATA, _BDAT)
        left = self._wait_since + (self.limits.data_timeout if data else self.limits.command_timeout) - self.clock.seconds()
        if left > 0:  # the deadline moved on since the timer was set
            self._timer = self.clock.callLater(left, self._timed_out)
            return
        self._time_limit("data" if data else "command", TIMEOUT)

    def _time_limit(self, why: str, reply: Reply) -> None:
        """A time limit ran out: say so and close."""
        if self._mode == _CLOSED:
            return
        log.info("timeout ({why}) from {client} in {mode}", why=why, client=self.session.peer_address, mode=self._mode,
                 event="timeout", code=reply.code, enhanced=reply.enhanced)  # fmt: skip
        self._out.append(reply.to_bytes())
        self._close()

    def _session_expired(self) -> None:
        self._session_call = None
        if not self._waiting:
            self._time_limit("session", SESSION_TOO_LONG)
            return
        # Our answer is pending (a queue write, say): it is given first, then the session ends
        # (see _ask); should it never come, the session ends a command timeout later anyway.
        self._session_over = True
        self._session_call = self.clock.callLater(self.limits.command_timeout, self._time_limit, "session",
                                                  SESSION_TOO_LONG)  # fmt: skip

    def _data_rate_ok(self, received: int) -> bool:
        """Count ``received`` octets of DATA/BDAT; False once the transfer is below min_data_rate."""
        self._data_octets += received
        elapsed = self.clock.seconds() - cast(float, self._data_since)  # set by _start_data
        rate = self.limits.min_data_rate
        return rate <= 0 or elapsed <= DATA_RATE_GRACE or self._data_octets >= rate * elapsed

    def _start_data(self) -> None:
        if self._data_since is None:
            self._data_since = self.clock.seconds()
            self._data_octets = 0

    # -- back-pressure ------------------------------------------------------------------------

    @property
    def buffered_input(self) -> int:
        """Octets received and not yet handled."""
        return len(self._buf) - self._pos

    @property
    def input_paused(self) -> bool:
        """Whether reading from the transport is paused (unhandled input over the bound)."""
        return self._reading_paused

    def _bound_input(self) -> None:
        over = len(self._buf) - self._pos > self.limits.max_pending_input
        if over != self._reading_paused and self._mode != _CLOSED:
            self._reading_paused = over
            if over:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """The transport cannot take more now (the client does not read, or TLS is busy): answer
        nothing more, so input waits and is bounded like input behind any pending answer. (Not
        reading at once would stall a TLS handshake that must read before it can write.)"""
        self._output_full = True

    def resumeProducing(self) -> None:
        self._output_full = False
        if not self._waiting and self._mode not in (_CLOSED, _GREET):
            self._process()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    # -- input --------------------------------------------------------------------------------

    def _append(self, data: bytes) -> None:
        """Add ``data`` after the unhandled input (copying only that, which is bounded)."""
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    def dataReceived(self, data: bytes) -> None:
        if self._mode == _CLOSED:
            return
        if self._mode == _GREET:
            if self.session.notes.get("trusted") or not self.limits.greet_pause:
                self._append(data)  # before the delegate answered connect: keep for later
                self._bound_input()
                return
            self._reply(Reply(554, "5.5.1", "Protocol error: talked before the greeting"), stage="connect")
            self._close()
            return
        if self._buf:
            self._append(data)
        else:
            self._buf = data
        if self._mode == _DATA or self._mode == _BDAT:
            self._arm_timer()  # content: an inactivity bound, plus the minimum rate
        if self._data_since is not None and not self._data_rate_ok(len(data)):
            self._time_limit("data_rate", DATA_TOO_SLOW)
            return
        self._process()

    def _process(self) -> None:
        try:
            # _buf is b"" once all of it is handled (so _pos < len(_buf) whenever _buf is not empty)
            while self._buf and not self._waiting and not self._output_full and self._mode not in (_CLOSED, _GREET):
                if self._mode == _DATA:
                    self._data_input()
                elif self._mode == _BDAT:
                    self._bdat_input()
                elif not self._command_input():
                    break
        except Exception:
            log.failure("unexpected error in the SMTP session with {client}", client=self.session.peer_address)
            self._buf, self._pos = b"", 0
            self._reset_transaction()
            self._mode = _COMMAND if self._mode != _CLOSED else _CLOSED
            self._reply(LOCAL_ERROR)
        if not self._waiting:
            self._flush()
        if self._reading_paused or (self._buf and len(self._buf) - self._pos > self.limits.max_pending_input):
            self._bound_input()

    def _flush(self) -> None:
        """Send every answer gathered while handling this batch of input in one write, at once
        when nothing is queued before it (:func:`write_now`): pipelined answers leave together
        (TCP_NODELAY is set: no Nagle wait)."""
        if self._out and self.transport is not None:
            out, self._out = self._out, []
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def _command_input(self) -> bool:
        """Handle one command line; False when no complete line is buffered."""
        buf, pos = self._buf, self._pos
        lf = buf.find(b"\n", pos)
        limit = self.limits.max_command_line
        if lf < 0:
            if len(buf) - pos > limit:
                self._buf, self._pos = b"", 0
                if not self._discard_line:
                    self._discard_line = True
                    self._error(Reply(500, "5.5.2", "Line too long"))
            return False
        line = buf[pos:lf]
        if lf + 1 == len(buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = lf + 1
        self._arm_timer()  # the next line's deadline counts from now, however its bytes trickle in
        if self._discard_line:
            self._discard_line = False
            return True
        if len(line) + 1 > limit:
            self._error(Reply(500, "5.5.2", "Line too long"))
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._mode == _AUTH:
            self._mode = _COMMAND
            self._sasl_step(cast(sasl.SaslExchange, self._sasl).respond(line))
            return True
        if b"\0" in line or b"\r" in line:
            self._error(Reply(500, "5.5.2", "Syntax error, NUL or bare CR in command"))
            return True
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(Reply(500, "5.5.2", "Syntax error, command is not UTF-8"))
            return True
        self._command(text)
        return True

    # -- replies ------------------------------------------------------------------------------

    def _reply(self, reply: Reply, stage: str = "", **fields: Any) -> None:
        self._out.append(reply.to_bytes())
        if reply.code >= 400:
            log.info(
                "rejected {stage} from {client}: {code} {enhanced} {text}",
                event="reject",
                stage=stage,
                client=self.session.peer_address,
                helo=self.session.helo_name,
                sender=self.session.transaction.sender if self.session.transaction else None,
                code=reply.code,
                enhanced=reply.enhanced,
                text=reply.text,
                **fields,
            )

    def _error(self, reply: Reply, stage: str = "command") -> None:
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            self._reply(reply, stage=stage)
            self._reply(Reply(421, "4.7.0", "Too many errors, closing connection"), stage=stage)
            self._close()
            return
        self._reply(reply, stage=stage)

    def _ask(self, method: Any, args: tuple[Any, ...], then: Any) -> None:
        """Call a delegate method; run ``then(reply)`` now, or when its Deferred fires (meanwhile
        no further input is read, so pipelined commands wait their turn)."""
        try:
            result = method(*args)
        except Exception:
            log.failure("delegate {method} failed", method=getattr(method, "__name__", "?"))
            result = LOCAL_ERROR
        if not isinstance(result, defer.Deferred):
            self._answered(then, result)
            return
        done: list[bool] = []

        def failed(failure: Failure) -> Reply:
            log.failure("delegate {method} failed", failure, method=getattr(method, "__name__", "?"))
            return LOCAL_ERROR

        def answered(reply: Any) -> None:
            done.append(True)
            self._answered(then, reply)

        result.addErrback(failed)
        result.addCallback(answered)
        if done:
            return
        self._waiting = True

        def resume(_: Any) -> None:
            self._waiting = False
            if self._mode == _CLOSED:
                return
            if self._session_over:
                self._time_limit("session", SESSION_TOO_LONG)
                return
            self._arm_timer()  # the client's time for the next command starts with our answer
            self._process()
            if self._shut_down_after_answer and not self._waiting:
                self.shut_down()

        result.addBoth(resume)

    def _answered(self, then: Any, reply: Any) -> None:
        if self._mode == _CLOSED and self.transport is None:
            return
        try:
            then(reply)
        except Exception:
            log.failure("error handling a delegate answer")
            self._reply(LOCAL_ERROR)

    # -- commands -----------------------------------------------------------------------------

    def _command(self, text: str) -> None:
        verb, _, argument = text.strip().partition(" ")
        verb = verb.upper()
        handler = getattr(self, f"smtp_{verb.lower()}", None) if verb.isalpha() else None
        if handler is None:
            if verb in _HTTP_VERBS:
                self._reply(Reply(421, "4.7.0", "This is an SMTP server"), stage="command")
                self._close()
                return
            self._error(Reply(500, "5.5.2", "Command unrecognized"))
            return
        if self._tls_pending:
            self._tls_pending = False
            self.session.tls = describe_tls(self.transport) or "TLS"
        handler(argument.strip())

    def smtp_helo(self, argument: str) -> None:
        self._hello(argument, esmtp=False)

    def smtp_ehlo(self, argument: str) -> None:
        if "EHLO" in self.factory.disabled_extensions:
            self._error(Reply(502, "5.5.1", "EHLO not supported here"))
            return
        self._hello(argument, esmtp=True)

    def _hello(self, argument: str, esmtp: bool) -> None:
        name = helo_name(argument)
        if name is None:
            self._error(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
            return

        def answered(reply: Reply | None) -> None:
            if reply is not None and not reply.is_positive:
                self._reply(reply, stage="helo")
                return
            self.session.helo_name = name
            self.session.esmtp = esmtp
            self._reset_transaction()
            if not esmtp:
                self._out.append(f"250 {self.factory.hostname}\r\n".encode())
                return
            offered = [e for e in _EXTENSIONS if e not in self.factory.disabled_extensions]
            lines = [self.factory.hostname, f"SIZE {self.limits.max_message_size}", *offered]
            if self.factory.tls_context_factory is not None and not self.session.tls:
                lines.append("STARTTLS")
            if self.session.tls and "REQUIRETLS" not in self.factory.disabled_extensions:
                lines.append("REQUIRETLS")  # RFC 8689: offered over TLS only
            if self._auth_offered():
                lines.append("AUTH PLAIN LOGIN")
            last = len(lines) - 1
            self._out.append("".join(f"250{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)).encode())

        self._ask(self.delegate.helo, (self.session, name), answered)

    def smtp_mail(self, argument: str) -> None:
        s = self.session
        if s.helo_name is None:
            self._reply(Reply(503, "5.5.1", "Send HELO or EHLO first"), stage="mail")
            return
        if s.transaction is not None:
            self._reply(Reply(503, "5.5.1", "Nested MAIL command"), stage="mail")
            return
        if self.factory.auth_required and not s.auth_user:
            self._reply(Reply(530, "5.7.0", "Authentication required"), stage="mail")
            return
        parsed = self._path_and_params(argument, "FROM:", "mail")
        if parsed is None:
            return
        path, params = parsed
        txn = Transaction(sender="", params=params)
        refused = apply_mail_params(txn, params, self.limits.max_message_size,
                                    "REQUIRETLS" not in self.factory.disabled_extensions, bool(s.tls))  # fmt: skip
        if refused is not None:
            self._reply(refused, stage="mail")
            return
        sender = self._address(path, txn.smtputf8, "mail")
        if sender is None:
            return
        txn.sender = sender

        def answered(reply: Reply | None) -> None:
            if reply is not None and not reply.is_positive:
                self._reply(reply, stage="mail", mail_from=sender)
                return
            s.transaction = txn
            self._reply(reply or Reply(250, "2.1.0", "Ok"))

        self._ask(self.delegate.mail_from, (s, sender, params), answered)

    def _path_and_params(self, argument: str, keyword: str, stage: str) -> tuple[str, dict[str, str]] | None:
        """``FROM:<path> params`` / ``TO:<path> params``, or None after answering the error."""
        if argument[: len(keyword)].upper() != keyword:
            verb = "MAIL" if stage == "mail" else "RCPT"
            self._error(Reply(501, "5.5.2", f"Syntax: {verb} {keyword}<address>"), stage=stage)
            return None
        try:
            path, words = split_path_and_params(argument[len(keyword) :])
            params = parse_params(words)
        except ValueError as e:
            self._error(Reply(501, "5.5.4", f"Syntax error in parameters: {e}"), stage=stage)
            return None
        if params and not self.session.esmtp:
            self._reply(Reply(555, "5.5.4", "Parameters need EHLO"), stage=stage)
            return None
        return path, params

    def _address(self, path: str, utf8: bool, stage: str) -> str | None:
        """The sender (``stage`` "mail") or recipient ("rcpt", where ``<postmaster>`` is one) the
        path names, or None after answering the error."""
        try:
            return parse_path(path, utf8=utf8, allow_postmaster=stage == "rcpt")
        except UnicodeError:
            self._reply(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"), stage=stage)
        except ValueError as e:
            enhanced, what = ("5.1.7", "sender") if stage == "mail" else ("5.1.3", "recipient")
            self._error(Reply(501, enhanced, f"Bad {what} address syntax: {e}"), stage=stage)
        return None

    def smtp_rcpt(self, argument: str) -> None:
        s = self.session
        txn = s.transaction
        if txn is None:
            self._reply(Reply(503, "5.5.1", "Need MAIL command first"), stage="rcpt")
            return
        parsed = self._path_and_params(argument, "TO:", "rcpt")
        if parsed is None:
            return
        path, params = parsed
        address = self._address(path, txn.smtputf8, "rcpt")
        if address is None:
            return
        if address == "":
            self._error(Reply(501, "5.1.3", "Null recipient"), stage="rcpt")
            return
        accepted = AcceptedRecipient(address, params)
        refused = apply_rcpt_params(accepted, params)
        if refused is not None:
            self._reply(refused, stage="rcpt", rcpt=address)
            return
        if len(txn.recipients) >= self.limits.max_recipients:
            self._reply(Reply(452, "4.5.3", "Too many recipients"), stage="rcpt", rcpt=address)
            return

        def answered(reply: Reply | None) -> None:
            if s.transaction is not txn:
                return
            if reply is not None and not reply.is_positive:
                self._reply(reply, stage="rcpt", rcpt=address)
                return
            txn.recipients.append(accepted)
            self._reply(reply or Reply(250, "2.1.5", "Ok"))

        self._ask(self.delegate.rcpt_to, (s, address, params), answered)

    def _data_ready(self, command: str) -> Reply | None:
        txn = self.session.transaction
        if txn is None:
            return Reply(503, "5.5.1", "Need MAIL command first")
        if not txn.recipients:
            return Reply(554, "5.5.1", "No valid recipients")
        return None

    def smtp_data(self, argument: str) -> None:
        if argument:
            self._error(Reply(501, "5.5.4", "DATA takes no arguments"), stage="data")
            return
        refused = self._data_ready("DATA")
        if refused is None and cast(Transaction, self.session.transaction).used_bdat:  # _data_ready saw one
            refused = Reply(503, "5.5.1", "DATA after BDAT in the same transaction")
        if refused is not None:
            self._reply(refused, stage="data")
            return
        self._mode = _DATA
        self._body = BodyCollector(self.limits.max_message_size)
        self._scanner = DataScanner(self._body)
        self._start_data()
        self._arm_timer()
        self._out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self._flush()

    def _data_input(self) -> None:
        buf = self._buf[self._pos :] if self._pos else self._buf
        self._buf, self._pos = b"", 0
        scanner = cast(DataScanner, self._scanner)  # set by smtp_data before _DATA mode
        ended = scanner.feed(buf)
        if ended is None:
            return
        trim, self._buf = ended
        self._mode = _COMMAND
        self._arm_timer()
        self._finish_message(scanner.body, trim=trim, dot_stuffed=True)

    def smtp_bdat(self, argument: str) -> None:
        words = argument.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or (len(words) == 2 and words[1].upper() != "LAST"):
            self._error(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"), stage="data")
            return
        size = int(words[0])
        refused = self._data_ready("BDAT")
        # The chunk is read whatever the answer: its octets must never be taken as commands.
        self._bdat_left = size
        self._bdat_last = len(words) == 2
        self._bdat_failed = refused
        if refused is None:
            txn = cast(Transaction, self.session.transaction)  # _data_ready saw one
            if not txn.used_bdat:
                txn.used_bdat = True
                self._body = BodyCollector(self.limits.max_message_size)
                self._start_data()
        self._mode = _BDAT
        self._arm_timer()
        if size == 0:
            self._bdat_done()

    def _bdat_input(self) -> None:
        pos = self._pos
        take = self._buf[pos : pos + self._bdat_left]
        self._bdat_left -= len(take)
        if pos + len(take) == len(self._buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = pos + len(take)
        if self._bdat_failed is None:
            cast(BodyCollector, self._body).feed(take)  # set by smtp_bdat when it did not fail
        if self._bdat_left == 0:
            self._bdat_done()

    def _bdat_done(self) -> None:
        self._mode = _COMMAND
        self._arm_timer()
        if self._bdat_failed is not None:
            self._reply(self._bdat_failed, stage="data")
            return
        body = cast(BodyCollector, self._body)  # set by smtp_bdat when it did not fail
        if body.size > self.limits.max_message_size:
            self._reply(cast(Reply, body.problem()), stage="data")  # over the size: never None
            self._reset_transaction()
            return
        if self._bdat_last:
            self._finish_message(body, trim=0, dot_stuffed=False)
        else:
            self._reply(Reply(250, "2.0.0", f"{body.size} octets received"))

    def _finish_message(self, body: BodyCollector, trim: int, dot_stuffed: bool) -> None:
        self._body = self._scanner = None
        self._data_since = None
        problem = body.problem(final_cr_ok=dot_stuffed)
        if problem is not None:
            self._reply(problem, stage="data", size=body.size)
            self._reset_transaction()
            return
        data = body.body(trim)
        if dot_stuffed:
            data = unstuff(data)

        def answered(reply: Reply | None) -> None:
            self._reply(reply or OK, stage="data", size=len(data))
            self._reset_transaction()

        self._ask(self.delegate.message, (self.session, data), answered)

    def _reset_transaction(self) -> None:
        self.session.transaction = None
        self._body = self._scanner = None
        self._data_since = None

    def smtp_rset(self, argument: str) -> None:
        self._reset_transaction()
        self._reply(OK)

    def smtp_noop(self, argument: str) -> None:
        self._reply(OK)

    def smtp_quit(self, argument: str) -> None:
        self._reply(SERVICE_CLOSING)
        self._close()

    def smtp_vrfy(self, argument: str) -> None:
        if not argument:
            self._error(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def smtp_expn(self, argument: str) -> None:
        self._reply(Reply(502, "5.5.1", "EXPN not available"))

    def smtp_help(self, argument: str) -> None:
        self._reply(Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"))

    # -- STARTTLS -----------------------------------------------------------------------------

    def smtp_starttls(self, argument: str) -> None:
        if self.factory.tls_context_factory is None:
            self._error(Reply(502, "5.5.1", "STARTTLS not available"))
            return
        if argument:
            self._error(Reply(501, "5.5.4", "STARTTLS takes no arguments"))
            return
        if self.session.tls or self._tls_pending:
            self._reply(Reply(503, "5.5.1", "TLS already active"))
            return
        if self.session.helo_name is None:
            self._reply(Reply(503, "5.5.1", "Send EHLO first"))
            return
        self._reply(Reply(220, "2.0.0", "Ready to start TLS"))
        self._flush()
        if self.buffered_input:
            log.info("discarded {n} octets pipelined after STARTTLS from {client}", n=self.buffered_input,
                     client=self.session.peer_address, event="starttls_injection")  # fmt: skip
            self._buf, self._pos = b"", 0  # CVE-2011-0411: nothing sent in plaintext survives the handshake
        self.transport.startTLS(self.factory.tls_context_factory)
        self.session.helo_name = None
        self.session.esmtp = False
        self.session.auth_user = None
        self._reset_transaction()
        self._tls_pending = True
        self.session.tls = "TLS"

    # -- AUTH (RFC 4954: PLAIN and LOGIN, only over TLS) --------------------------------------

    def _auth_offered(self) -> bool:
        return self.factory.authenticator is not None and bool(self.session.tls)

    def smtp_auth(self, argument: str) -> None:
        s = self.session
        if self.factory.authenticator is None:
            self._error(Reply(502, "5.5.1", "AUTH not available"))
            return
        if not s.tls:
            self._reply(Reply(538, "5.7.11", "Encryption required for requested authentication mechanism"),
                        stage="auth")  # fmt: skip
            return
        if s.helo_name is None or not s.esmtp:
            self._reply(Reply(503, "5.5.1", "Send EHLO first"), stage="auth")
            return
        if s.auth_user:
            self._reply(Reply(503, "5.5.1", "Already authenticated"), stage="auth")
            return
        if s.transaction is not None:
            self._reply(Reply(503, "5.5.1", "AUTH not allowed during a mail transaction"), stage="auth")
            return
        mechanism, _, initial = argument.partition(" ")
        exchange = sasl.start(mechanism)
        if exchange is None:
            self._error(sasl.UNKNOWN_MECHANISM)
            return
        self._sasl = exchange
        self._sasl_step(exchange.begin(initial.strip()))

    def _sasl_step(self, step: sasl.Step) -> None:
        """Send the exchange's challenge, check its credentials, or answer its refusal."""
        if isinstance(step, sasl.Challenge):
            self._mode = _AUTH
            self._out.append(f"334 {step.text}\r\n".encode())
            return
        self._sasl = None
        if isinstance(step, sasl.Credentials):
            self._auth_check(step.user, step.password)
        elif step.syntax:
            self._error(step.reply, stage="auth")
        else:
            self._reply(step.reply, stage="auth")

    def _auth_check(self, user: str, password: str) -> None:
        auth = self.factory.authenticator
        client = self.session.peer_address

        def answered(ok: Any) -> None:
            if ok is True:
                auth.succeeded(client)
                self._auth_failures = 0
                self.session.auth_user = user
                log.info("authenticated {user} from {client}", user=user, client=client, event="auth")
                self._reply(Reply(235, "2.7.0", "Authentication successful"))
                return
            if isinstance(ok, Reply):
                self._reply(ok, stage="auth")
                return
            self._auth_failures += 1
            self._reply(Reply(535, "5.7.8", "Authentication credentials invalid"), stage="auth", user=user)
            if auth.failed(client) or self._auth_failures >= self.limits.max_auth_failures:
                self._reply(Reply(421, "4.7.0", "Too many failed authentications, closing connection"), stage="auth")
                self._close()

        self._ask(auth.check, (user, password), answered)


class SMTPServerFactory(Factory):
    """Builds one :class:`SMTPServerProtocol` per connection, sharing delegate, limits and clock."""

    protocol = SMTPServerProtocol

    def __init__(
        self,
        delegate: Any,
        hostname: str,
        limits: ServerLimits,
        clock: IReactorTime,
        tls_context_factory: Any = None,
        authenticator: Any = None,
        auth_required: bool = False,
        disabled_extensions: frozenset[str] = frozenset(),
        connections: ConnectionSlots | None = None,
    ) -> None:
        self.delegate = delegate
        self.hostname = hostname
        self.limits = limits
        self.clock = clock
        self.tls_context_factory = tls_context_factory
        self.authenticator = authenticator
        self.auth_required = auth_required
        self.disabled_extensions = disabled_extensions  # e.g. {"PIPELINING"} to act as an older peer
        self.connections = connections  # the cap on open connections (None: no cap), maybe shared
        self.id_prefix = os.urandom(4).hex() + "-"
        self.counter = itertools.count(1)
        self.sessions: set[SMTPServerProtocol] = set()  # open sessions (drained at shutdown)
        self.on_empty: Any = None  # called when the last open session ends

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        p = self.protocol(self)
        p.factory = self
        return p
