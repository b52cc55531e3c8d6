"""The Sendmail milter protocol, MTA side (protocol version 6), for scanning at SMTP time.

One connection per message, at the end of DATA: option negotiation, then connect, helo, envfrom,
envrcpt, data, each header, end of headers, the body in chunks and end of message — each step
skipped or sent without waiting for a reply as the milter negotiated. The milter's answers map
to a :class:`pymta.inbound.scan.Verdict`: continue/accept, reject (its own reply or 550 5.7.1),
tempfail (451 4.7.1), discard, and at end of message add/insert/change header and quarantine.
Packets are bounded in size; anything else a milter says is a protocol error (the scanner's
``on_error`` then applies). OpenDKIM, rspamd's milter mode, clamav-milter and spamass-milter
speak this.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.config import parse_milter_socket
from pymta.inbound.scan import (
    ACCEPT,
    DISCARD,
    QUARANTINE,
    REJECT,
    TEMPFAIL,
    HeaderEdit,
    ScanError,
    ScanRequest,
    Verdict,
    scanner_reply,
)

log = Logger(namespace="pymta.inbound.milter")

VERSION = 6
MAX_PACKET = 1 << 20  # a milter reply larger than this is a protocol error
BODY_CHUNK = 65535  # MILTER_CHUNK_SIZE
MAX_EDITS = 1000  # header changes one milter may make to one message

# actions we let a milter take (SMFIF_*): add headers, change/delete headers, quarantine
SMFIF_ADDHDRS = 0x01
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
OUR_ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE

# protocol steps a milter may ask us to skip (SMFIP_NO*) or not to wait for (SMFIP_NR_*)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
P_NR_HDR, P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA = 0x1000, 0x2000, 0x4000, 0x8000, 0x10000
P_NR_UNKN, P_NR_EOH, P_NR_BODY, P_HDR_LEADSPC = 0x20000, 0x40000, 0x80000, 0x100000
OUR_PROTOCOL = 0x1FFFFF  # every one of the above

_FINAL = {b"a", b"c", b"r", b"t", b"d", b"y"}
_EOM_EDITS = {b"h": SMFIF_ADDHDRS, b"i": SMFIF_ADDHDRS, b"m": SMFIF_CHGHDRS, b"q": SMFIF_QUARANTINE}


def _z(*parts: str) -> bytes:
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


def _strings(data: bytes, count: int) -> list[str]:
    """The first ``count`` NUL-terminated strings of a packet."""
    parts = data.split(b"\0")
    if len(parts) < count:
        raise ScanError("milter sent a truncated packet")
    return [p.decode("utf-8", "replace") for p in parts[:count]]


class MilterProtocol(Protocol):
    """Milter packets: 4-byte length, command byte, data. Replies wait in order for :meth:`expect`."""

    # Twisted's interfaces are zope Interfaces, whose methods mypy reads without ``self``.
    transport: Any

    def __init__(self) -> None:
        self._buffer = b""
        self._packets: deque[tuple[bytes, bytes]] = deque()
        self._waiting: deque[defer.Deferred[Any]] = deque()
        self.failure: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = struct.unpack("!I", self._buffer[:4])
            if length < 1 or length > MAX_PACKET:
                self._fail(ScanError(f"milter packet of {length} octets"))
                return
            if len(self._buffer) < 4 + length:
                return
            packet, self._buffer = self._buffer[4 : 4 + length], self._buffer[4 + length :]
            item = (packet[:1], packet[1:])
            if self._waiting:
                self._waiting.popleft().callback(item)
            else:
                self._packets.append(item)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._fail(ScanError("milter closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = Failure(exc)
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(self.failure)
        if self.transport is not None:
            self.transport.abortConnection()

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.transport.write(struct.pack("!I", len(data) + 1) + command + data)

    def expect(self) -> defer.Deferred[Any]:
        if self._packets:
            return defer.succeed(self._packets.popleft())
        if self.failure is not None:
            return defer.fail(self.failure)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append(d)
        return d


class _Done(Exception):
    """A milter's answer that ends the conversation early (accept, reject, tempfail, discard)."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict


class MilterScanner:
    """One ``[[scan.milter]]``: connects per message and runs the whole milter dialogue."""

    def __init__(self, socket: str, reactor: Any, timeout: float, on_error: str, connector: Any = None) -> None:
        where = parse_milter_socket(socket)
        if where is None:
            raise ValueError(f"not a milter socket: {socket!r}")
        self.name = f"milter {socket}"
        self.socket = socket
        self.reactor = reactor
        self.timeout = timeout
        self.on_error = on_error
        kind, host, port = where
        if connector is not None:
            self._endpoint = connector
        elif kind == "unix":
            self._endpoint = UNIXClientEndpoint(reactor, host, timeout=max(1, int(timeout)))
        else:
            cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
            self._endpoint = cls(reactor, host, port, timeout=max(1, int(timeout)))

    def scan(self, request: ScanRequest) -> defer.Deferred[Any]:
        proto = MilterProtocol()

        def cancel(_: defer.Deferred[Any]) -> None:
            if proto.transport is not None:
                proto.transport.abortConnection()
            connecting.cancel()

        result: defer.Deferred[Any] = defer.Deferred(cancel)
        connecting = self._endpoint.connect(Factory.forProtocol(lambda: proto))

        def connected(_: Any) -> defer.Deferred[Any]:
            return _dialogue(proto, request)

        def finished(outcome: Any) -> None:
            if proto.transport is not None:
                proto.transport.loseConnection()
            if not result.called:
                if isinstance(outcome, Failure):
                    if outcome.check(error.ConnectError, error.ConnectionRefusedError):
                        outcome = Failure(ScanError(f"cannot connect: {outcome.getErrorMessage()}"))
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        connecting.addCallback(connected).addBoth(finished)
        return result


async def _reply(proto: MilterProtocol) -> tuple[bytes, bytes]:
    while True:
        command, data = await proto.expect()
        if command != b"p":  # SMFIR_PROGRESS: still working
            return command, data


def _final(command: bytes, data: bytes, stage: str) -> Verdict | None:
    """A milter's answer to a step: None to go on, a Verdict to stop with."""
    if command == b"c":
        return None
    if command == b"a":
        return Verdict(ACCEPT)
    if command == b"r":
        return Verdict(REJECT, scanner_reply(550, "5.7.1", "", REJECT))
    if command == b"t":
        return Verdict(TEMPFAIL, scanner_reply(451, "4.7.1", "", TEMPFAIL))
    if command == b"d":
        return Verdict(DISCARD)
    if command == b"y":
        text = data.rstrip(b"\0").decode("utf-8", "replace").replace("\r\n", " ")
        code_text, _, rest = text.partition(" ")
        if len(code_text) != 3 or not code_text.isdigit() or code_text[0] not in "45":
            raise ScanError(f"milter reply code not 4xx/5xx at {stage}: {text[:60]!r}")
        enhanced: str | None
        enhanced, _, words = rest.partition(" ")
        if not (enhanced.count(".") == 2 and enhanced.replace(".", "").isdigit()):
            enhanced, words = None, rest
        action = REJECT if code_text[0] == "5" else TEMPFAIL
        return Verdict(action, scanner_reply(int(code_text), enhanced, words.strip(), action))
    raise ScanError(f"unexpected milter answer {command!r} at {stage}")


def _headers(message: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(name, value) of each header field (folds kept as CRLF) and the body after the blank line."""
    end = message.find(b"\r\n\r\n")
    head, body = (message[:end], message[end + 4 :]) if end >= 0 else (message, b"")
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\r\n" + text)
        elif ":" in text:
            name, _, value = text.partition(":")
            fields.append((name, value))
    return fields, body


@defer.inlineCallbacks
def _dialogue(proto: MilterProtocol, req: ScanRequest) -> Any:
    proto.send(b"O", struct.pack("!III", VERSION, OUR_ACTIONS, OUR_PROTOCOL))
    command, data = yield defer.Deferred.fromCoroutine(_reply(proto))
    if command != b"O" or len(data) < 12:
        raise ScanError(f"milter did not negotiate (answered {command!r})")
    version, actions, protocol = struct.unpack("!III", data[:12])
    if version < 2 or version > VERSION:
        raise ScanError(f"milter protocol version {version} not supported")
    actions &= OUR_ACTIONS

    @defer.inlineCallbacks
    def step(
        command: bytes, data: bytes, skip: int, no_reply: int, stage: str, macros: dict[str, str] | None = None
    ) -> Any:
        if protocol & skip:
            return
        if macros:
            proto.send(b"D", command + _z(*[x for kv in macros.items() for x in kv]))
        proto.send(command, data)
        if protocol & no_reply:
            return
        answer, payload = yield defer.Deferred.fromCoroutine(_reply(proto))
        if answer == b"s" and command == b"B" and protocol & P_SKIP:
            raise _Skip()
        verdict = _final(answer, payload, stage)
        if verdict is not None:
            raise _Done(verdict)

    address = req.client_address
    family = b"6" if ":" in address else b"4" if address else b"U"
    connect = _z((req.client_name or f"[{address}]") if address else "localhost") + family
    if address:
        connect += struct.pack("!H", 0) + _z(address)
    try:
        yield step(b"C", connect, P_NOCONNECT, P_NR_CONN, "connect",
                   {"j": req.hostname, "{daemon_name}": "pymta", "{client_addr}": address,
                    "{client_name}": req.client_name or "unknown", "_": f"{req.client_name or 'unknown'} [{address}]"})
        yield step(b"H", _z(req.helo or address or "localhost"), P_NOHELO, P_NR_HELO, "helo",
                   {"{tls_version}": (req.tls or "").partition(" ")[0]} if req.tls else None)
        mail_macros = {"i": req.qid, "{mail_addr}": req.sender}
        if req.auth_user:
            mail_macros["{auth_authen}"] = req.auth_user
        yield step(b"M", _z(f"<{req.sender}>"), P_NOMAIL, P_NR_MAIL, "mail", mail_macros)
        for rcpt in req.recipients:
            yield step(b"R", _z(f"<{rcpt}>"), P_NORCPT, P_NR_RCPT, "rcpt", {"{rcpt_addr}": rcpt})
        if version >= 4:
            yield step(b"T", b"", P_NODATA, P_NR_DATA, "data")
        fields, body = _headers(req.message)
        for name, value in fields:
            if not protocol & P_HDR_LEADSPC:
                value = value[1:] if value.startswith(" ") else value
            yield step(b"L", _z(name, value), P_NOHDRS, P_NR_HDR, "header")
        yield step(b"N", b"", P_NOEOH, P_NR_EOH, "eoh")
        try:
            for offset in range(0, len(body), BODY_CHUNK):
                yield step(b"B", body[offset : offset + BODY_CHUNK], P_NOBODY, P_NR_BODY, "body")
        except _Skip:
            pass
    except _Done as done:
        proto.send(b"Q")
        return done.verdict
    proto.send(b"D", b"E" + _z("i", req.qid))
    proto.send(b"E")
    edits: list[HeaderEdit] = []
    quarantine = None
    while True:
        command, data = yield defer.Deferred.fromCoroutine(_reply(proto))
        if command in _FINAL:
            break
        needed = _EOM_EDITS.get(command)
        if needed is None or not actions & needed:
            raise ScanError(f"milter action {command!r} not negotiated")
        if len(edits) >= MAX_EDITS:
            raise ScanError(f"milter made more than {MAX_EDITS} header changes")
        if command == b"h":
            name, value = _strings(data, 2)
            edits.append(HeaderEdit("add", name, value))
        elif command in (b"i", b"m"):
            if len(data) < 4:
                raise ScanError("milter sent a truncated header change")
            (index,) = struct.unpack("!I", data[:4])
            name, value = _strings(data[4:], 2)
            edits.append(HeaderEdit("add" if command == b"i" else "change", name, value, index))
        else:
            (reason,) = _strings(data, 1)
            quarantine = reason or "quarantined by milter"
    proto.send(b"Q")
    verdict = _final(command, data, "end of message") or Verdict(ACCEPT)
    if verdict.action in (ACCEPT,):
        verdict.edits = edits
        if quarantine:
            verdict.action, verdict.quarantine = QUARANTINE, quarantine
    return verdict


class _Skip(Exception):
    """SMFIR_SKIP: the milter wants no more body chunks."""

