"""What came back: RFC 3464 DSNs, non-standard bounces, ARF complaints (RFC 5965), auto-replies
(RFC 3834 and vacation heuristics) and human replies — parsed into a :class:`Report`.

``parse_message(raw)`` never raises: anything unreadable is a Report of kind ``unknown``.
Recipients of a bounce come from the DSN fields when there are any, else from flufl.bounce's
detectors and the addresses the text says failed; status codes and diagnostic text decide the
reason (:mod:`pymta.feedback.classify`).
"""

from __future__ import annotations

import email
import email.policy
import json
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses, parseaddr
from typing import Any

from pymta.feedback.classify import classify, find_status

DSN, ARF, AUTOREPLY, REPLY, UNKNOWN = "dsn", "arf", "autoreply", "reply", "unknown"

_ADDRESS = re.compile(r"<?([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.[A-Za-z]{2,})>?")
_SMTP_CODE = re.compile(r"(?<![\d.])([245]\d\d)(?:[ -]|$)")
_BOUNCE_SENDER = re.compile(r"mailer-daemon|postmaster|mail ?delivery|mdaemon|mailer@|bounce|microsoftexchange", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status|failure|failed|has failed|notification|problem|report)|"
    r"failure notice|returned mail|mail delivery failed|could not be delivered|non[- ]?delivery|"
    r"delivery (was )?delayed|warning: could not send|mail system error|nondeliverable|rejected|"
    r"not delivered|delivery notification|returned to sender|permanent error|error sending",
    re.I,
)
_AUTOREPLY_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort|réponse)|out of (the )?office|abwesenheit|"
    r"vacation|on vacation|away from|i am away|autoreply|auto:|ooo\b|réponse automatique|"
    r"respuesta automática|risposta automatica|automatisch antwoord|absence)",
    re.I,
)
_COMPLAINT_SUBJECT = re.compile(r"complaint about message|abuse report|spam (complaint|report)|feedback report", re.I)
_TEMPORARY = re.compile(r"delay|will (be )?retr|still (trying|being retried)|temporar|try(ing)? again|warning", re.I)


@dataclass
class RecipientReport:
    address: str
    action: str | None = None
    status: str | None = None
    diagnostic: str = ""
    remote_mta: str | None = None
    reason: str | None = None
    hard: bool | None = None


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
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if payload is None:
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _address(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if ";" in value:
        value = value.split(";", 1)[1]
    value = value.strip().strip("<>").strip()
    m = _ADDRESS.search(value)
    return m.group(1).lower() if m else None


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The per-message and per-recipient field groups of a message/delivery-status part."""
    payload = part.get_payload()
    blocks: list[dict[str, str]] = []
    if isinstance(payload, list):
        for sub in payload:
            blocks.append({k.lower(): str(v) for k, v in sub.items()})
        if blocks:
            return blocks
    text = payload if isinstance(payload, str) else _text(part)
    for chunk in re.split(r"\r?\n\s*\r?\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in chunk.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if sep and name.strip():
                last = name.strip().lower()
                fields[last] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def _original_headers(msg: Message) -> dict[str, str] | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/rfc822-headers", "text/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                return {k.lower(): str(v) for k, v in payload[0].items()}
            text = payload if isinstance(payload, str) else _text(part)
            try:
                inner = email.message_from_string(text.lstrip())
            except Exception:
                return None
            return {k.lower(): str(v) for k, v in inner.items()}
    return None


def parse_message(raw: bytes) -> Report:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        return _parse(msg, raw)
    except Exception:
        return Report(kind=UNKNOWN)


def _parse(msg: Message, raw: bytes) -> Report:
    subject = str(msg.get("Subject", "") or "")
    from_address = _address(parseaddr(str(msg.get("From", "") or ""))[1])
    report = Report(subject=subject, from_address=from_address)
    report.original_headers = _original_headers(msg)
    ctype = msg.get_content_type()
    report_type = (msg.get_param("report-type") or "").lower() if ctype == "multipart/report" else ""
    parts = list(msg.walk())
    if report_type == "feedback-report" or any(p.get_content_type() == "message/feedback-report" for p in parts):
        return _arf(msg, parts, report)
    dsn_parts = [p for p in parts if p.get_content_type() in ("message/delivery-status", "message/global-delivery-status")]
    if dsn_parts:
        _dsn(dsn_parts, report)
        if report.details:
            _body_diagnostic(msg, report)
            return _summarise(report)
    if _ses_notification(msg, report):
        return _summarise(report) if report.details else report
    if _COMPLAINT_SUBJECT.search(subject) and report.original_headers is not None:
        return _arf(msg, parts, report)
    bounce_like = _looks_bounce(msg, subject, from_address) or bool(dsn_parts)
    if not bounce_like and _looks_autoreply(msg, subject):
        report.kind, report.action, report.reason = AUTOREPLY, "autoreply", "vacation"
        report.recipients = [from_address] if from_address else []
        return report
    if bounce_like:
        _plain_bounce(msg, report)
        if report.details:
            return _summarise(report)
        report.kind = DSN
        return report
    report.kind, report.action = REPLY, "reply"
    report.recipients = []
    return report


def _arf(msg: Message, parts: list[Message], report: Report) -> Report:
    report.kind, report.action, report.reason = ARF, "complaint", "feedback"
    fields: dict[str, str] = {}
    for p in parts:
        if p.get_content_type() == "message/feedback-report":
            for block in _field_blocks(p):
                fields.update(block)
    report.feedback_type = (fields.get("feedback-type") or "abuse").strip().lower()
    recipients = []
    for key in ("original-rcpt-to", "removal-recipient"):
        addr = _address(fields.get(key))
        if addr:
            recipients.append(addr)
    if not recipients and report.original_headers:
        for _, addr in getaddresses([report.original_headers.get("to", "")]):
            if "@" in addr:
                recipients.append(addr.lower())
    report.recipients = sorted(set(recipients))
    return report


def _ses_notification(msg: Message, report: Report) -> bool:
    """Amazon SES / SNS JSON notifications (Bounce, Complaint, Delivery)."""
    if msg.is_multipart():
        return False
    body = _text(msg).strip()
    if not body.startswith("{") or "notificationType" not in body and "eventType" not in body:
        return False
    try:
        data = json.loads(body[: body.rfind("}") + 1])
        if isinstance(data.get("Message"), str):
            data = json.loads(data["Message"])
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


def _dsn(dsn_parts: list[Message], report: Report) -> None:
    report.kind = DSN
    for part in dsn_parts:
        blocks = _field_blocks(part)
        remote_default = None
        for block in blocks:
            if "reporting-mta" in block and "final-recipient" not in block:
                remote_default = block.get("reporting-mta")
                continue
            recipient = _address(block.get("original-recipient")) if False else None
            recipient = _address(block.get("final-recipient")) or _address(block.get("original-recipient"))
            if not recipient:
                continue
            action = (block.get("action") or "").strip().lower() or None
            status = find_status(block.get("status", "")) or block.get("status", "").strip() or None
            diagnostic = (block.get("diagnostic-code") or "").strip()
            if ";" in diagnostic[:12]:
                diagnostic = diagnostic.split(";", 1)[1].strip()
            remote = block.get("remote-mta") or remote_default
            report.details.append(RecipientReport(recipient, action, status, diagnostic, remote))


def _body_diagnostic(msg: Message, report: Report) -> None:
    """Where the DSN fields carry no diagnostic, take the human-readable text near the address."""
    text = None
    for d in report.details:
        if d.diagnostic:
            continue
        if text is None:
            text = _human_text(msg)
        d.diagnostic = _near(text, d.address)


def _human_text(msg: Message) -> str:
    chunks = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("text/plain", "text/html") and not _inside_returned(msg, part):
            body = _text(part)
            if ctype == "text/html":
                body = re.sub(r"<[^>]+>", " ", body)
            chunks.append(body)
    return "\n".join(chunks)


def _inside_returned(msg: Message, target: Message) -> bool:
    for part in msg.walk():
        if part.get_content_type() == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and any(target is p for sub in payload for p in sub.walk()):
                return True
    return False


def _near(text: str, address: str, window: int = 400) -> str:
    i = text.lower().find(address.lower())
    if i < 0:
        return " ".join(text[:window].split())
    return " ".join(text[max(0, i - 80) : i + window].split())


def _looks_autoreply(msg: Message, subject: str) -> bool:
    auto = str(msg.get("Auto-Submitted", "") or "").strip().lower()
    if auto.startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Vacation"):
        return True
    if str(msg.get("Precedence", "") or "").strip().lower() == "auto_reply":
        return True
    if str(msg.get("X-Auto-Response-Suppress", "") or "") and _AUTOREPLY_SUBJECT.search(subject.strip()):
        return True
    return bool(_AUTOREPLY_SUBJECT.search(subject.strip()))


def _looks_bounce(msg: Message, subject: str, from_address: str | None) -> bool:
    sender = str(msg.get("From", "") or "") + " " + str(msg.get("Return-Path", "") or "")
    return bool(_BOUNCE_SENDER.search(sender) or _BOUNCE_SUBJECT.search(subject) or msg.get("X-Failed-Recipients"))


def _plain_bounce(msg: Message, report: Report) -> None:
    report.kind = DSN
    try:
        from flufl.bounce import all_failures

        temporary, permanent = all_failures(msg)
    except Exception:
        temporary, permanent = frozenset(), frozenset()
    found: dict[str, bool] = {}
    for addr in permanent:
        found[addr.decode("utf-8", "replace").lower().strip("<>")] = False
    for addr in temporary:
        found.setdefault(addr.decode("utf-8", "replace").lower().strip("<>"), True)
    for value in msg.get_all("X-Failed-Recipients") or []:
        for addr in re.split(r"[,\s]+", str(value)):
            a = _address(addr)
            if a:
                found.setdefault(a, False)
    text = _human_text(msg)
    if not found:
        for a in _addresses_in_failure_text(text, msg):
            found.setdefault(a, False)
    delayed_message = bool(_TEMPORARY.search(report.subject))
    for address, temporary_failure in found.items():
        diagnostic = _near(text, address)
        action = "delayed" if (temporary_failure or delayed_message) else "failed"
        report.details.append(RecipientReport(address, action, find_status(diagnostic), diagnostic))


def _addresses_in_failure_text(text: str, msg: Message) -> list[str]:
    """Addresses a bounce text names before the returned message starts (not our own)."""
    cut = re.search(r"(-{3,}.*(original message|returned message|headers)|^received: |original message follows)",
                    text, re.I | re.M)  # fmt: skip
    head = text[: cut.start()] if cut else text
    ignore = {a for a in (_address(str(msg.get("From", ""))), _address(str(msg.get("To", "")))) if a}
    out = []
    for m in _ADDRESS.finditer(head):
        a = m.group(1).lower()
        if a not in ignore and a not in out and not _BOUNCE_SENDER.search(a.split("@")[0]):
            out.append(a)
    return out[:20]


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
        reason, hard = classify(status, d.diagnostic, code)
        if d.action == "delayed":
            if reason in ("undefined", "userunknown", "hostunknown", "networkerror", "systemerror") and not (
                status and status not in ("4.0.0", "4.4.7")
            ):
                reason = "expired"
            hard = False
        d.status, d.reason, d.hard = status or d.status, reason, hard
    report.recipients = sorted({d.address for d in report.details})
    first = report.details[0]
    actions = {d.action for d in report.details}
    report.action = first.action if len(actions) == 1 else ("failed" if "failed" in actions else first.action)
    reasons = {d.reason for d in report.details}
    report.reason = first.reason if len(reasons) == 1 else first.reason
    hards = {d.hard for d in report.details}
    report.hard = first.hard if len(hards) == 1 else None
    report.status = first.status
    report.diagnostic = first.diagnostic
    report.remote_mta = first.remote_mta
    return report
