"""What came back: RFC 3464 DSNs, non-standard bounces, ARF complaints (RFC 5965), auto-replies
(RFC 3834 and vacation heuristics) and human replies — parsed into a :class:`Report`.

``parse_message(raw)`` never raises: anything unreadable is a Report of kind ``unknown``. It runs
in linear time on bounded input: at most MAX_MESSAGE_BYTES are read, line endings become LF, every
field and text is cut to a stated length before a pattern sees it, and addresses are found by one
scan (:func:`iter_addresses`). Recipients of a bounce come from the DSN fields of the report (also
when its MIME structure is broken), else from flufl.bounce's detectors and the addresses the
report's own text says failed; never from the returned message. Status codes, the diagnostic text
around a recipient and the SMTP command it answered decide the reason
(:mod:`pymta.feedback.classify`).
"""

from __future__ import annotations

import email
import email.header
import email.policy
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses, parseaddr
from typing import Any, cast

from pymta.feedback.classify import classify, find_status
from pymta.wordings import wordings

DSN, ARF, AUTOREPLY, REPLY, UNKNOWN = "dsn", "arf", "autoreply", "reply", "unknown"

# flufl.bounce logs a traceback for every detector that trips over a malformed message; a bad
# bounce is ordinary input here, and the parse goes on without that detector
logging.getLogger("flufl.bounce").propagate = False
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())

# Every pattern below sees a bounded input: what parse_message reads of a message, and how much of
# one field, one text part or one failure paragraph any pattern is run over.
MAX_MESSAGE_BYTES = 256 * 1024  # the report is at the start; the rest is the returned message
MAX_FIELD = 2048  # one header or DSN field value
MAX_TEXT = 64 * 1024  # the human-readable text of one part
MAX_WINDOW = 4096  # the diagnostic text taken around a recipient
MAX_RECIPIENTS = 1000  # recipient blocks read from one report
MAX_PARTS = 200  # MIME parts looked at (deeper or wider structures are cut off)
MAX_BOUNDARIES = 32  # multipart levels read: the email parser tests each line against every open boundary
MAX_DETECTOR_BYTES = 32 * 1024  # what flufl.bounce's line-by-line detectors are given
MAX_DETECTOR_LINE = 998  # and the longest line they see (RFC 5322's limit)

_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.!#$%&'*+/=?^_`{|}~-")
_WORDINGS = wordings().feedback  # what kind of message came back: data in pymta/wordings.toml
_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_TLD = re.compile(r"[A-Za-z]{2,63}")
_SMTP_CODE = re.compile(r"(?<![\d.])([245]\d\d)(?:[ -]|$)")
_BOUNCE_SENDER = _WORDINGS["bounce_sender"]
_BOUNCE_SUBJECT = _WORDINGS["bounce_subject"]
# auto-reply subjects, matched after RFC 2047 decoding, in the languages mail systems use for them
_AUTOREPLY_SUBJECT = _WORDINGS["autoreply_subject"]
_COMPLAINT_SUBJECT = _WORDINGS["complaint_subject"]
# "in reply to RCPT TO command" (Postfix), ">>> DATA" (Sendmail), "after end of data" (Exim) ...
_COMMAND = re.compile(
    r"(?:in reply to|after|>>>|while sending|error from remote mail server after|did not like our|"
    r"most progress was|smtp:|\[)[ \t\n:]{0,3}"
    r"(end of data|data|rcpt|mail from|mail|helo|ehlo|starttls|auth|bdat|initial connection|connect)\b|"
    r"(does not like recipient|rcpt[ _]to\b)",
    re.I,
)
_COMMANDS = {"end of data": "DATA", "data": "DATA", "bdat": "DATA", "rcpt": "RCPT", "mail from": "MAIL", "mail": "MAIL",
             "helo": "HELO", "ehlo": "HELO", "starttls": "STARTTLS", "auth": "AUTH", "initial connection": "CONN",
             "connect": "CONN"}  # fmt: skip


def smtp_command(text: str) -> str | None:
    """The last SMTP command a failure text says it answered, or None."""
    found = None
    for m in _COMMAND.finditer(text[:MAX_WINDOW]):
        found = _COMMANDS[m.group(1).lower()] if m.group(1) else "RCPT"
    return found


_UNSUBSCRIBE_SUBJECT = _WORDINGS["unsubscribe_subject"]
_FAILURE_TEXT = _WORDINGS["failure_text"]
_CHALLENGE = _WORDINGS["challenge"]
_TEMPORARY = _WORDINGS["temporary"]


def iter_addresses(text: str) -> Iterator[tuple[int, str]]:
    """(position, lower-cased address) of each plausible address in ``text``, in one linear scan.

    From each ``@`` the local part is read backwards (at most 64 characters, RFC 5321) and the domain
    forwards (at most 253); nothing is re-read from another start, so the work is linear in the
    text. A local part that starts with ``/`` (a file path) or is empty (``@host``) is no address.
    """
    i = text.find("@")
    while i >= 0:
        j = i
        if i > 1 and text[i - 1] == '"':  # a quoted local part: "first..last"@example.org
            q = text.rfind('"', max(0, i - 66), i - 1)
            j = q if q >= 0 and "\n" not in text[q:i] else i
        while j > 0 and i - j <= 64 and text[j - 1] in _LOCAL_CHARS:
            j -= 1
        local = text[j:i].lstrip("'`=.")
        if local[:5].lower() in ("smtp=", "smtp:") or local[:7].lower() == "rfc822=":
            local = local.split("=", 1)[-1]
        m = _DOMAIN.match(text, i + 1)
        quoted = local.startswith('"') and local.endswith('"') and len(local) > 2
        if local and len(local) <= (66 if quoted else 64) and m and not local.startswith("/") and (
            quoted or not local.endswith(".")
        ):
            labels = m.group().split(".")
            while labels and not _TLD.fullmatch(labels[-1]):
                labels.pop()
            if len(labels) >= 2 and all(labels):
                yield j, f"{local}@{'.'.join(labels)}".lower()
        i = text.find("@", i + 1)


@dataclass
class RecipientReport:
    address: str
    action: str | None = None
    status: str | None = None
    diagnostic: str = ""
    remote_mta: str | None = None
    reason: str | None = None
    hard: bool | None = None
    command: str | None = None  # the SMTP command the failure answered, when the report says


@dataclass
class Report:
    kind: str = UNKNOWN
    recipients: list[str] = field(default_factory=list)
    action: str | None = None
    hard: bool | None = None
    reason: str | None = None
    status: str | None = None
    diagnostic: str = ""
    remote_mta: str | None = None
    feedback_type: str | None = None
    details: list[RecipientReport] = field(default_factory=list)
    original_headers: dict[str, str] | None = None  # of the returned message, when included
    from_address: str | None = None
    subject: str = ""

    def as_json(self, file: str) -> dict[str, Any]:
        return {
            "file": file,
            "kind": self.kind,
            "recipients": self.recipients,
            "action": self.action,
            "hard": self.hard,
            "reason": self.reason,
            "status": self.status,
        }


def _text(part: Message) -> str:
    """The decoded text of one part, at most MAX_TEXT characters."""
    try:
        payload = cast(bytes | None, part.get_payload(decode=True))  # bytes for a leaf part
    except Exception:
        payload = None
    if payload is None:
        raw = part.get_payload()
        return raw[:MAX_TEXT] if isinstance(raw, str) else ""
    payload = payload[: MAX_TEXT * 4]
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")[:MAX_TEXT]
    except LookupError:
        return payload.decode("utf-8", "replace")[:MAX_TEXT]


def _header(msg: Message, name: str) -> str:
    """A header's value as text, cut to MAX_FIELD; RFC 2047 encoded words decoded."""
    value = msg.get(name)
    if value is None:
        return ""
    try:
        text = str(email.header.make_header(email.header.decode_header(str(value)[:MAX_FIELD])))
    except Exception:
        text = str(value)
    return " ".join(text[:MAX_FIELD].split())


def _address(value: str | None) -> str | None:
    if not value:
        return None
    value = value[:MAX_FIELD].strip()
    if ";" in value[:40]:
        value = value.split(";", 1)[1]
    for _, address in iter_addresses(value):
        return address
    return None


def _walk(msg: Message) -> list[tuple[Message, bool]]:
    """Every part (at most MAX_PARTS, at most 32 deep), each with whether it lies inside a returned
    message; iterative, so no nesting depth can exhaust the stack."""
    out: list[tuple[Message, bool]] = []
    stack: list[tuple[Message, bool, int]] = [(msg, False, 0)]
    while stack and len(out) < MAX_PARTS:
        part, inside, depth = stack.pop()
        out.append((part, inside))
        payload = part.get_payload()
        if isinstance(payload, list) and depth < 32:
            returned = inside or part.get_content_type() == "message/rfc822"
            stack.extend((p, returned, depth + 1) for p in reversed(payload[:MAX_PARTS]) if isinstance(p, Message))
    return out


_DSN_FIELDS = frozenset(
    ("final-recipient", "original-recipient", "action", "status", "diagnostic-code", "remote-mta", "reporting-mta",
     "last-attempt-date", "arrival-date", "x-actual-recipient", "received-from-mta", "will-retry-until",
     "x-postfix-sender", "x-original-message-id", "original-envelope-id", "x-supplementary-info")
)  # fmt: skip
_PER_RECIPIENT = frozenset(("final-recipient", "original-recipient", "action", "status", "remote-mta"))
_FIELD_NAME = re.compile(r"([A-Za-z][A-Za-z0-9-]{0,60})[ \t]*:")


def _split_blocks(items: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Field groups from (name, value) pairs in order: a per-recipient field seen twice starts a new
    group, so recipient blocks without blank lines between them each count."""
    blocks: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for name, value in items:
        if name in fields and name in _PER_RECIPIENT:
            blocks.append(fields)
            fields = {}
        fields.setdefault(name, value[:MAX_FIELD])
    if fields:
        blocks.append(fields)
    return blocks


def _scan_fields(text: str, lenient: bool = False) -> list[dict[str, str]]:
    """Field groups of DSN text: a blank or non-field line ends a group. With ``lenient`` (a report
    whose MIME structure is broken) indented lines naming a DSN field are fields too."""
    blocks: list[dict[str, str]] = []
    items: list[tuple[str, str]] = []
    last = -1
    for line in text.splitlines():
        if len(blocks) > MAX_RECIPIENTS:
            break
        stripped = line.strip()
        m = _FIELD_NAME.match(stripped)
        name = m.group(1).lower() if m else ""
        if line[:1] in (" ", "\t") and last >= 0 and stripped and not (lenient and name in _DSN_FIELDS):
            if len(items[last][1]) < MAX_FIELD:
                items[last] = (items[last][0], items[last][1] + " " + stripped)
            continue
        if m and (line[:1] not in (" ", "\t") or name in _DSN_FIELDS):
            items.append((name, stripped[m.end() :].strip()))
            last = len(items) - 1
            continue
        if items:
            blocks.extend(_split_blocks(items))
        items, last = [], -1
    if items:
        blocks.extend(_split_blocks(items))
    return blocks


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The per-message and per-recipient field groups of a message/delivery-status part."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        blocks: list[dict[str, str]] = []
        for sub in payload[:MAX_RECIPIENTS]:
            if isinstance(sub, Message):
                blocks.extend(_split_blocks([(k.lower(), str(v)) for k, v in sub.items()]))
        return blocks
    return _scan_fields(payload if isinstance(payload, str) else _text(part))


def _original_headers(walked: list[tuple[Message, bool]]) -> dict[str, str] | None:
    for part, _ in walked:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/rfc822-headers", "text/rfc822-headers", "message/global",
                     "message/global-headers"):  # fmt: skip
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                return {k.lower(): str(v)[:MAX_FIELD] for k, v in cast(Message, payload[0]).items()}
            text = payload if isinstance(payload, str) else _text(part)
            try:
                inner = email.message_from_string(text[:MAX_TEXT].lstrip())
            except Exception:
                return None
            return {k.lower(): str(v)[:MAX_FIELD] for k, v in inner.items()}
    return None


def parse_message(raw: bytes) -> Report:
    """A Report for one message; reads at most MAX_MESSAGE_BYTES of it and never raises."""
    raw = raw[:MAX_MESSAGE_BYTES]
    if b"\r" in raw:  # CRLF and CR-only line endings parse as LF
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    raw = _cut_deep_nesting(raw)
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        return _parse(msg, raw)
    except Exception:  # RecursionError and whatever a broken message makes the email package raise
        return Report(kind=UNKNOWN)


_BOUNDARY_PARAM = re.compile(rb"boundary[ \t]*=", re.I)


def _cut_deep_nesting(raw: bytes) -> bytes:
    """The message up to the line declaring its MAX_BOUNDARIES+1-th multipart boundary."""
    for n, m in enumerate(_BOUNDARY_PARAM.finditer(raw)):
        if n == MAX_BOUNDARIES:
            return raw[: raw.rfind(b"\n", 0, m.start()) + 1]
    return raw


def _parse(msg: Message, raw: bytes) -> Report:
    walked = _walk(msg)
    parts = [p for p, _ in walked]
    subject = _header(msg, "Subject")
    from_address = _address(parseaddr(_header(msg, "From"))[1])
    report = Report(subject=subject, from_address=from_address)
    report.original_headers = _original_headers(walked)
    ctype = msg.get_content_type()
    report_type = (cast(str | None, msg.get_param("report-type")) or "").lower() if ctype == "multipart/report" else ""
    if report_type == "feedback-report" or any(p.get_content_type() == "message/feedback-report" for p in parts):
        return _arf(msg, parts, report)
    dsn_types = ("message/delivery-status", "message/global-delivery-status")
    # a report returned inside the returned message is about someone else: the outer one counts
    dsn_parts = [p for p, inside in walked if p.get_content_type() in dsn_types and not inside]
    dsn_parts = dsn_parts or [p for p in parts if p.get_content_type() in dsn_types]
    if dsn_parts:
        _dsn([b for p in dsn_parts for b in _field_blocks(p)], report)
    if not report.details and _has_dsn_fields(raw):
        # broken MIME (missing, indented or wrong boundaries): the fields are still in the text
        _dsn(_scan_fields(raw.decode("utf-8", "replace"), lenient=True), report)
    if report.details:
        _body_diagnostic(walked, report)
        return _summarise(report)
    if _ses_notification(msg, report):
        return _summarise(report) if report.details else report
    if _COMPLAINT_SUBJECT.search(subject) and report.original_headers is not None:
        return _arf(msg, parts, report)
    if _UNSUBSCRIBE_SUBJECT.match(subject) or _header(msg, "X-Apple-Unsubscribe").lower() == "true":
        # a mailto: List-Unsubscribe request: the sender opts out (RFC 2369, RFC 8058's mail form)
        report.kind, report.action, report.reason, report.feedback_type = ARF, "complaint", "feedback", "opt-out"
        report.recipients = [from_address] if from_address else []
        return report
    if _CHALLENGE.search(subject + " " + _human_text(walked)[:MAX_WINDOW]):
        # challenge-response ("confirm you are a sender", whitelist requests): automatic, never a failure
        report.kind, report.action, report.reason = AUTOREPLY, "autoreply", "challenge"
        report.recipients = [from_address] if from_address else []
        return report
    bounce_like = _looks_bounce(msg, subject) or bool(dsn_parts)
    if not bounce_like and report.original_headers is not None:
        # a notice that returns the message and says it failed, whatever its sender and subject
        bounce_like = bool(_FAILURE_TEXT.search(_human_text(walked)[:MAX_WINDOW]))
    if not bounce_like and _looks_autoreply(msg, subject):
        report.kind, report.action, report.reason = AUTOREPLY, "autoreply", "vacation"
        report.recipients = [from_address] if from_address else []
        return report
    if bounce_like:
        _plain_bounce(msg, raw, walked, report)
        if not report.details and dsn_parts:
            _returned_recipient([b for p in dsn_parts for b in _field_blocks(p)], report)
            _body_diagnostic(walked, report)
        if report.details:
            return _summarise(report)
        report.kind = DSN
        return report
    report.kind, report.action = REPLY, "reply"
    report.recipients = []
    return report


_DSN_MARKERS = re.compile(rb"^[ \t]*(final|original)-recipient[ \t]*:", re.I | re.M)


def _has_dsn_fields(raw: bytes) -> bool:
    return _DSN_MARKERS.search(raw) is not None


def _arf(msg: Message, parts: list[Message], report: Report) -> Report:
    report.kind, report.action, report.reason = ARF, "complaint", "feedback"
    items: list[tuple[str, str]] = []
    for p in parts:
        if p.get_content_type() == "message/feedback-report":
            payload = p.get_payload()
            if isinstance(payload, list):
                items += [(k.lower(), str(v)) for sub in payload if isinstance(sub, Message) for k, v in sub.items()]
            else:
                items += [kv for block in _scan_fields(_text(p)) for kv in block.items()]
    fields = dict(reversed(items))
    report.feedback_type = (fields.get("feedback-type") or "abuse").strip().lower()[:40]
    recipients = []
    for key, value in items[:MAX_RECIPIENTS]:
        if key in ("original-rcpt-to", "removal-recipient"):
            addr = _address(value)
            if addr:
                recipients.append(addr)
    if not recipients and report.original_headers:
        for _, addr in getaddresses([report.original_headers.get("to", "")[:MAX_FIELD]]):
            if "@" in addr:
                recipients.append(addr.lower())
    report.recipients = sorted(set(recipients))
    return report


def _ses_notification(msg: Message, report: Report) -> bool:
    """Amazon SES / SNS JSON notifications (Bounce, Complaint, Delivery)."""
    if msg.is_multipart():
        return False
    body = _text(msg).strip()
    if not body.startswith("{") or ("notificationType" not in body and "eventType" not in body):
        return False
    try:
        data = json.loads(body[: body.rfind("}") + 1], strict=False)  # mail may fold long lines inside strings
        if isinstance(data.get("Message"), str):
            data = json.loads(data["Message"], strict=False)
    except (ValueError, TypeError):
        return False
    kind = str(data.get("notificationType") or data.get("eventType") or "")
    if kind == "Complaint":
        complaint = data.get("complaint") or {}
        report.kind, report.action, report.reason = ARF, "complaint", "feedback"
        report.feedback_type = complaint.get("complaintFeedbackType") or "abuse"
        report.recipients = sorted({str(r.get("emailAddress", "")).lower() for r in complaint.get("complainedRecipients", [])
                                    if r.get("emailAddress")})  # fmt: skip
        return True
    if kind == "Bounce":
        bounce = data.get("bounce") or {}
        transient = str(bounce.get("bounceType", "")).lower() == "transient"
        report.kind = DSN
        for r in bounce.get("bouncedRecipients", []):
            address = _address(str(r.get("emailAddress", "")))
            if address:
                diagnostic = str(r.get("diagnosticCode") or "")
                if ";" in diagnostic[:12]:
                    diagnostic = diagnostic.split(";", 1)[1].strip()
                report.details.append(RecipientReport(
                    address, "delayed" if transient else (r.get("action") or "failed"),
                    r.get("status"), diagnostic or str(bounce.get("bounceSubType") or ""), bounce.get("remoteMtaIp"),
                ))  # fmt: skip
        return True
    if kind == "Delivery":
        delivery = data.get("delivery") or {}
        report.kind = DSN
        for address in delivery.get("recipients", []):
            report.details.append(RecipientReport(str(address).lower(), "delivered", "2.0.0", ""))
        return True
    return False


def _dsn(blocks: list[dict[str, str]], report: Report) -> None:
    report.kind = DSN
    remote_default = None
    seen: set[str] = set()
    for block in blocks[:MAX_RECIPIENTS]:
        if "reporting-mta" in block and "final-recipient" not in block:
            remote_default = block.get("reporting-mta")
            continue
        recipient = _address(block.get("final-recipient")) or _address(block.get("original-recipient"))
        if not recipient or (recipient in seen and not block.get("action")):
            continue
        seen.add(recipient)
        action = (block.get("action") or "").strip().lower()[:20] or None
        status = find_status(block.get("status", "")) or block.get("status", "").strip()[:20] or None
        diagnostic = (block.get("diagnostic-code") or "").strip()[:MAX_WINDOW]
        if ";" in diagnostic[:12] and not diagnostic.lower().startswith("x-unix"):  # X-Unix: a local program's exit
            diagnostic = diagnostic.split(";", 1)[1].strip()
        remote = block.get("remote-mta") or remote_default
        report.details.append(RecipientReport(recipient, action, status, diagnostic, remote))


def _returned_recipient(fields: list[dict[str, str]], report: Report) -> None:
    """A report with no recipient block: the returned message's To: says who, but only when it
    names exactly one address (with several, which one failed is a guess)."""
    status = next((find_status(b.get("status", "")) for b in fields if b.get("status")), None)
    action = next((b.get("action", "").strip().lower() for b in fields if b.get("action")), None) or "failed"
    headers = report.original_headers or {}
    to = [a for _, a in iter_addresses(" ".join(headers.get(k, "") for k in ("to", "cc"))[:MAX_FIELD])]
    if len(set(to)) == 1:
        report.details.append(RecipientReport(to[0], action[:20], status))


def _body_diagnostic(walked: list[tuple[Message, bool]], report: Report) -> None:
    """Where the DSN fields carry no diagnostic, take the human-readable text near the address;
    the SMTP command comes from the diagnostic or else from that text."""
    text = _report_head(_human_text(walked))
    for d in report.details:
        near = _near(text, d.address, strict=True)
        if not d.diagnostic:
            d.diagnostic = near
        d.command = smtp_command(d.diagnostic) or smtp_command(near)


_TAG = re.compile(r"<[^<>]*>")


def _human_text(walked: list[tuple[Message, bool]]) -> str:
    """The text and HTML parts of the report itself (not of the returned message), tags removed;
    a multipart whose boundary never appears counts as text (its parts were not found)."""
    chunks = []
    for part, inside in walked:
        ctype = (part.get_content_type().split() or [""])[0]  # a folded, broken Content-Type still says text/plain
        broken = ctype.startswith("multipart/") and isinstance(part.get_payload(), str)
        if (ctype in ("text/plain", "text/html") or broken) and not inside:
            body = _unsplit_text(_text(part)) if broken else _text(part)
            if ctype == "text/html":
                body = _TAG.sub(" ", body)
            chunks.append(body)
    return "\n".join(chunks)[:MAX_TEXT]


_BOUNDARY_LINE = re.compile(r"^--[^\n]{0,200}\n", re.M)


def _unsplit_text(text: str) -> str:
    """The text of a multipart body the email parser could not split: each ``--boundary`` chunk
    read as a part of its own, its MIME headers dropped, text kept (at most 20 chunks)."""
    out = []
    for chunk in _BOUNDARY_LINE.split(text[:MAX_TEXT])[:20]:
        try:
            sub = email.message_from_string(chunk.lstrip("\n"))
        except Exception:
            continue
        if not sub.keys():
            out.append(chunk)
        elif sub.get_content_maintype() == "text":
            out.append(_text(sub))
    return "\n".join(out)


# Where the returned message starts inside a plain-text bounce: a separator line, or the first header
# line of the original (Received:, DKIM-Signature: ...). Matched per line, each line cut first.
_RETURNED_START = re.compile(
    r"^(-{2,} ?(original message|returned message|this is a copy|below this line|message header|"
    r"the header|headers of|original headers|undelivered message)|"
    r"(received|dkim-signature|return-path|content-type|message-id|x-mailer|mime-version|x-original-to|"
    r"delivered-to|authentication-results|arc-seal|x-google-dkim-signature)[ \t]?:|"
    r"original message follows|(-+ ?)?(below|the) (this line )?is a copy|"
    r"\*\*\* ?(original|returned) message)",
    re.I,
)


def _report_head(text: str) -> str:
    """The part of a bounce text before the returned message (its headers or a separator line)."""
    pos = 0
    for line in text.split("\n"):
        if _RETURNED_START.match(line[:200].strip()):
            return text[:pos]
        pos += len(line) + 1
    return text


def _near(text: str, address: str, window: int = 1000, strict: bool = False) -> str:
    """The text around where ``address`` is named: 80 characters before it and ``window`` after,
    or 400 before when no reply code follows (a report that gives the error first). When the
    address is not named, the start of the text (or nothing when ``strict``: a DSN's fields
    already say more than an unrelated paragraph)."""
    i = text.lower().find(address.lower())
    if i < 0:
        return "" if strict else " ".join(text[:window].split())
    after = text[i : i + window]
    before = 80 if (_SMTP_CODE.search(after) or find_status(after)) else 400
    return " ".join(text[max(0, i - before) : i + window].split())


def _looks_autoreply(msg: Message, subject: str) -> bool:
    auto = _header(msg, "Auto-Submitted").lower()
    if auto.startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Vacation"):
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    return bool(_AUTOREPLY_SUBJECT.search(subject.strip()))


def _looks_bounce(msg: Message, subject: str) -> bool:
    sender = _header(msg, "From") + " " + _header(msg, "Return-Path")
    return bool(_BOUNCE_SENDER.search(sender) or _BOUNCE_SUBJECT.search(subject) or msg.get("X-Failed-Recipients"))


def _plain_bounce(msg: Message, raw: bytes, walked: list[tuple[Message, bool]], report: Report) -> None:
    report.kind = DSN
    try:
        from flufl.bounce import all_failures

        temporary, permanent = all_failures(_detector_copy(msg, raw))
    except Exception:
        temporary, permanent = frozenset(), frozenset()
    found: dict[str, bool] = {}
    for addr in sorted(permanent):
        a = _address(addr.decode("utf-8", "replace"))
        if a:
            found[a] = False
    for addr in sorted(temporary):
        a = _address(addr.decode("utf-8", "replace"))
        if a:
            found.setdefault(a, True)
    failed = set()
    for value in (msg.get_all("X-Failed-Recipients") or [])[:10]:
        for _, a in iter_addresses(str(value)[:MAX_FIELD]):
            found.setdefault(a, False)
            failed.add(a)
    everything = _human_text(walked)
    text = _report_head(everything)
    named = list(iter_addresses(text))  # each text is scanned once
    if found:
        # the bounce's own From/To (the sender) counts only when the report itself names it
        ours = {a for a in (_address(_header(msg, "From")), _address(_header(msg, "To"))) if a}
        ours -= {a for _, a in named} | failed
        # a detector's address that the report names only as a sender, a Message-ID or a contact is no recipient
        mentions: dict[str, list[int]] = {}
        for pos, a in iter_addresses(everything) if len(everything) > len(text) else named:
            if a in found:
                mentions.setdefault(a, []).append(pos)
        found = {a: t for a, t in found.items()
                 if a not in ours and not _named_only_as_other(everything, mentions.get(a, []))}  # fmt: skip
    if not found:
        for a in _addresses_in_failure_text(text, msg, named):
            found.setdefault(a, False)
    delayed_message = bool(_TEMPORARY.search(report.subject))
    for address, temporary_failure in list(found.items())[:MAX_RECIPIENTS]:
        diagnostic = _near(text, address)
        action = "delayed" if (temporary_failure or delayed_message) else "failed"
        report.details.append(RecipientReport(address, action, find_status(diagnostic), diagnostic,
                                              command=smtp_command(diagnostic)))  # fmt: skip


def _detector_copy(msg: Message, raw: bytes) -> Message:
    """What flufl.bounce's detectors are given: the first MAX_DETECTOR_BYTES, every line cut to
    MAX_DETECTOR_LINE (some of their patterns are quadratic in the length of a line)."""
    if len(raw) <= MAX_DETECTOR_BYTES and all(len(line) <= MAX_DETECTOR_LINE for line in raw.split(b"\n")):
        return msg
    lines = raw[:MAX_DETECTOR_BYTES].split(b"\n")
    return email.message_from_bytes(b"\n".join(line[:MAX_DETECTOR_LINE] for line in lines))


_NOT_RECIPIENT_BEFORE = re.compile(
    r"(mail from|return-path|sender|from|reply-to|message-id|in-reply-to|references|envelope-from|smtp.mailfrom|"
    r"contact|generated from|expanded from|[0-9a-f]{8,40}>)[:= ]{0,3}<?$",
    re.I,
)


def _named_only_as_other(text: str, positions: list[int]) -> bool:
    """True when every mention of an address (at ``positions`` in ``text``) is as a sender,
    Message-ID or contact, or in a ``Received: ... for <address>`` trace line."""
    return bool(positions) and all(
        _NOT_RECIPIENT_BEFORE.search(text[max(0, p - 20) : p]) or _in_received(text, p) for p in positions
    )


def _in_received(text: str, pos: int) -> bool:
    """Whether ``pos`` lies in a Received: header (its first line or a folded continuation)."""
    start = text.rfind("\n", 0, pos) + 1
    for _ in range(8):
        line = text[start : start + 10]
        if line[:9].lower() == "received:":
            return True
        if line[:1] not in (" ", "\t") or start == 0:
            return False
        start = text.rfind("\n", 0, start - 1) + 1
    return False


def _addresses_in_failure_text(text: str, msg: Message, named: list[tuple[int, str]], limit: int = 20) -> list[str]:
    """Addresses a bounce ``text`` names (``named``, from :func:`iter_addresses`) before the
    returned message starts: not our own, not the envelope sender of an SMTP transcript
    (``MAIL FROM:<...>``), not a mailer daemon."""
    ignore = {a for a in (_address(_header(msg, "From")), _address(_header(msg, "To"))) if a}
    out: list[str] = []
    for pos, a in named:
        if a in ignore or a in out or a.startswith("mailer-daemon@"):
            continue
        if _NOT_RECIPIENT_BEFORE.search(text[max(0, pos - 20) : pos]):
            continue
        out.append(a)
        if len(out) >= limit:
            break
    return out


def _summarise(report: Report) -> Report:
    for d in report.details:
        if d.action in (None, ""):
            d.action = "failed"
        if d.action in ("delivered", "relayed", "expanded"):
            d.reason, d.hard = "delivered", False
            continue
        status = d.status if d.status and d.status[0] in "245" else None
        if not status and d.diagnostic:
            status = find_status(d.diagnostic)
        code_match = _SMTP_CODE.search(d.diagnostic or "")
        code = int(code_match.group(1)) if code_match else None
        reason, hard = classify(status, d.diagnostic, code, command=d.command, action=d.action)
        if d.action == "delayed":
            if reason in ("undefined", "onhold"):
                reason = "expired"
            hard = False  # a delay warning is never a failure
        d.status, d.reason, d.hard = status or d.status, reason, hard
    report.recipients = sorted({d.address for d in report.details})
    first = report.details[0]
    actions = {d.action for d in report.details}
    report.action = first.action if len(actions) == 1 else ("failed" if "failed" in actions else first.action)
    report.reason = first.reason
    hards = {d.hard for d in report.details}
    report.hard = first.hard if len(hards) == 1 else None
    report.status = first.status
    report.diagnostic = first.diagnostic
    report.remote_mta = first.remote_mta
    return report
