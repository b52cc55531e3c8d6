"""Content scanning at SMTP time: runs the configured scanners (rspamd, milters) over a message
before the 250 and combines their verdicts into one.

Every scanner sees the message as received (with our ``Received:`` header first). The first
reject, tempfail or discard ends the chain; header changes and a quarantine from the scanners
that ran are applied in order. A scanner that is down, exceeds its timeout or breaks its protocol
gets its configured ``on_error`` action (``accept``: the message goes on unscanned by it;
``tempfail``: 451 4.7.1), with one log record saying which scanner and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from pymta.smtp.replies import Reply

log = Logger(namespace="pymta.inbound.scan")

ACCEPT = "accept"
REJECT = "reject"
TEMPFAIL = "tempfail"
DISCARD = "discard"
QUARANTINE = "quarantine"

MAX_HEADER_VALUE = 8192  # octets of one header a scanner may add or change
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,100}$")  # RFC 5322 field name: printable ASCII without colon


@dataclass(frozen=True)
class ScanRequest:
    """What a scanner is told: the envelope, the client, and the message as received (CRLF lines)."""

    qid: str
    sender: str
    recipients: list[str]
    message: bytes
    hostname: str = "localhost"
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    auth_user: str | None = None
    tls: str | None = None


@dataclass
class HeaderEdit:
    """``add`` (appended, or inserted at ``index`` 0-based among all fields), ``change`` (the
    ``index``-th 1-based field of that name; an empty value deletes it)."""

    op: str
    name: str
    value: str
    index: int | None = None


@dataclass
class Verdict:
    """One scanner's (or the chain's) decision."""

    action: str = ACCEPT
    reply: Reply | None = None  # for reject/tempfail: what the client is told
    edits: list[HeaderEdit] = field(default_factory=list)
    quarantine: str | None = None  # a reason: the message goes into hold/
    scanner: str = ""


class Scanner(Protocol):
    name: str
    timeout: float
    on_error: str

    def scan(self, request: ScanRequest) -> defer.Deferred[Any]: ...


class ScanError(Exception):
    """The scanner broke its protocol or said something we cannot use."""


class ScanChain:
    """The configured scanners in order; :meth:`scan` fires with the combined :class:`Verdict`."""

    def __init__(self, scanners: list[Any], clock: Any) -> None:
        self.scanners = scanners
        self.clock = clock

    @defer.inlineCallbacks
    def scan(self, request: ScanRequest) -> Any:
        combined = Verdict()
        for scanner in self.scanners:
            d = scanner.scan(request)
            d.addTimeout(scanner.timeout, self.clock)
            try:
                verdict = yield d
            except Exception as e:
                why = "timed out" if isinstance(e, defer.TimeoutError) else (str(e) or type(e).__name__)
                log.warn(
                    "scanner {scanner} failed for {qid}: {error}; {action}",
                    scanner=scanner.name, qid=request.qid, error=why, action=scanner.on_error, event="scan_error",
                )  # fmt: skip
                if scanner.on_error == TEMPFAIL:
                    reply = Reply(451, "4.7.1", "Content scanner unavailable, try again later")
                    return Verdict(TEMPFAIL, reply, scanner=scanner.name)
                continue
            verdict.scanner = scanner.name
            log.info("scanner {scanner} says {action} for {qid}", scanner=scanner.name, action=verdict.action,
                     qid=request.qid, reply=str(verdict.reply) if verdict.reply else None,
                     quarantine=verdict.quarantine, headers=len(verdict.edits), event="scan")  # fmt: skip
            if verdict.action in (REJECT, TEMPFAIL, DISCARD):
                return verdict
            combined.edits.extend(verdict.edits)
            if verdict.quarantine and not combined.quarantine:
                combined.quarantine = verdict.quarantine
                combined.scanner = scanner.name
        if combined.quarantine:
            combined.action = QUARANTINE
        return combined


def scanner_reply(code: int, enhanced: str | None, text: str, action: str) -> Reply:
    """The client's reply for a scanner's reject/tempfail: its own text when it gave one, with the
    class kept right (a reject is 5xx, a tempfail 4xx) and 5.7.1 / 4.7.1 as the default codes."""
    if action == REJECT:
        default = Reply(550, "5.7.1", text or "Message content rejected")
        ok = 500 <= code < 600
    else:
        default = Reply(451, "4.7.1", text or "Message content cannot be accepted now, try again later")
        ok = 400 <= code < 500
    if not ok:
        return default
    if enhanced is None or enhanced[0] != str(code)[0]:
        enhanced = default.enhanced
    return Reply(code, enhanced, _clean(text) or default.text)


def _clean(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)[:400].strip()


def _header_value(value: str) -> bytes:
    """A scanner's header value as folded CRLF lines; never an extra header or a line without a fold."""
    lines = [line.rstrip("\r") for line in value.replace("\r\n", "\n").split("\n")]
    lines = [lines[0]] + [line if line[:1] in (" ", "\t") else "\t" + line for line in lines[1:] if line.strip()]
    return "\r\n".join(lines).encode("utf-8", "replace")[:MAX_HEADER_VALUE]


def apply_edits(message: bytes, edits: list[HeaderEdit]) -> bytes:
    """The message with the scanners' header additions and changes (the body is never touched)."""
    if not edits:
        return message
    end = message.find(b"\r\n\r\n")
    if end < 0:  # a header without a body
        head, rest = (message[:-2], b"\r\n") if message.endswith(b"\r\n") else (message, b"\r\n")
    else:
        head, rest = message[:end], message[end:]
    fields: list[bytes] = []  # each a whole field, folded lines included, without the final CRLF
    for line in head.split(b"\r\n") if head else []:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    for edit in edits:
        if not _HEADER_NAME.match(edit.name):
            log.warn("scanner header name refused: {name!r}", name=edit.name[:100], event="scan_header_refused")
            continue
        value = _header_value(edit.value)
        new = edit.name.encode() + b": " + value
        if edit.op == "add":
            if edit.index is None:
                fields.append(new)
            else:
                fields.insert(max(0, min(edit.index, len(fields))), new)
            continue
        prefix = edit.name.lower().encode() + b":"
        positions = [i for i, f in enumerate(fields) if f.lower().startswith(prefix)]
        index = edit.index or 1
        if index <= len(positions):
            if value.strip():
                at = positions[index - 1]
                fields[at] = fields[at].split(b":", 1)[0] + b": " + value  # the field keeps its name's spelling
            else:
                del fields[positions[index - 1]]
        elif value.strip():
            fields.append(new)
    return b"\r\n".join(fields) + rest
