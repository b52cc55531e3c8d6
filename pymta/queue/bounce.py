"""RFC 3464 delivery status notifications we generate (failed, delayed, delivered, relayed).

Never for a message whose sender is ``<>`` (a DSN is never answered with a DSN), and only as the
recipient's NOTIFY allows (RFC 3461): default = FAILURE and DELAY; NEVER = nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pymta.dates import header_date
from pymta.envelope import DELIVERED, EXPIRED, FAILED, RELAYED, Envelope, Recipient
from pymta.smtp.replies import default_enhanced

ACTION_FOR_STATE = {FAILED: "failed", EXPIRED: "failed", DELIVERED: "delivered", RELAYED: "relayed"}
FULL_BODY_LIMIT = 1_048_576  # without RET, the whole message comes back up to this size


def notify_allows(recipient: Recipient, action: str) -> bool:
    """Whether the recipient's NOTIFY asks for a DSN of this ``action``."""
    notify = recipient.notify
    if notify is None:
        return action in ("failed", "delayed")
    if "NEVER" in notify:
        return False
    wanted = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS"}[action]
    return wanted in notify


def _status_of(recipient: Recipient, action: str) -> str:
    reply = recipient.reply or {}
    enhanced = reply.get("enhanced") or ""
    if enhanced:
        return enhanced
    if action == "delivered" or action == "relayed":
        return "2.0.0"
    if recipient.state == EXPIRED:
        return "4.4.7"
    return default_enhanced(int(reply.get("code") or (400 if action == "delayed" else 500))) or "5.0.0"


def _diagnostic(recipient: Recipient) -> str | None:
    reply = recipient.reply
    if not reply or not reply.get("code"):
        return None
    text = " ".join(str(reply.get("text") or "").split())
    return f"smtp; {reply['code']} {reply.get('enhanced') or ''} {text}".replace("  ", " ").strip()


def _clean(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)


def _orcpt_field(orcpt: str) -> str:
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type}; {_clean(address)}"


def _normalise_crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def build_dsn(
    envelope: Envelope,
    recipients: Iterable[Recipient],
    action: str,
    body: bytes,
    hostname: str,
    now: float,
    retry_until: float | None = None,
) -> bytes | None:
    """The DSN message (bytes, CRLF lines) about ``recipients`` of ``envelope``, or None when none
    is due (null sender, NOTIFY, no recipients). ``now``: the caller's wall clock, never a
    monotonic one: it is written as the ``Date:`` field (and the arrival date when none is known)."""
    if not envelope.sender:
        return None
    rcpts = [r for r in recipients if notify_allows(r, action)]
    if not rcpts:
        return None
    boundary = f"{envelope.qid}.{os.urandom(6).hex()}/{hostname}"
    subject = {
        "failed": "Undelivered Mail Returned to Sender",
        "delayed": "Delayed Mail (still being retried)",
        "delivered": "Successful Mail Delivery Report",
        "relayed": "Mail Delivery Report (relayed)",
    }[action]
    human = {
        "failed": "This is the mail system at host {h}.\n\nI'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n",
        "delayed": "This is the mail system at host {h}.\n\n####### THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND "
        "YOUR MESSAGE. #######\n\nYour message could not be delivered yet; the mail system will keep trying.\n",
        "delivered": "This is the mail system at host {h}.\n\nYour message was successfully delivered to the "
        "recipients below.\n",
        "relayed": "This is the mail system at host {h}.\n\nYour message was relayed to a system that does not "
        "report delivery status; no further notices will follow.\n",
    }[action].format(h=hostname)
    lines = [human, ""]
    for r in rcpts:
        diag = _diagnostic(r)
        lines.append(f"<{_clean(r.address)}>: {diag[6:] if diag else action}")
    headers = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{_clean(envelope.sender)}>",
        f"Subject: {subject}",
        f"Date: {header_date(now)}",
        f"Message-ID: <{envelope.qid}.{action}.{int(now)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    status = [f"Reporting-MTA: dns; {hostname}", f"X-Pymta-Queue-ID: {envelope.qid}"]
    if envelope.envid:
        status.append(f"Original-Envelope-Id: {_clean(envelope.envid)}")
    status.append(f"Arrival-Date: {header_date(envelope.arrival or now)}")
    for r in rcpts:
        status.append("")
        status.append(f"Final-Recipient: rfc822; {_clean(r.address)}")
        if r.orcpt:
            status.append(f"Original-Recipient: {_orcpt_field(r.orcpt)}")
        status.append(f"Action: {action}")
        status.append(f"Status: {_status_of(r, action)}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {_clean(r.remote_mta.split(' ')[0])}")
        diag = _diagnostic(r)
        if diag:
            status.append(f"Diagnostic-Code: {_clean(diag)}")
        if r.updated:
            status.append(f"Last-Attempt-Date: {header_date(r.updated)}")
        if action == "delayed" and retry_until:
            status.append(f"Will-Retry-Until: {header_date(retry_until)}")
    ret = envelope.ret or ("FULL" if len(body) <= FULL_BODY_LIMIT and action == "failed" else "HDRS")
    original = _normalise_crlf(body)
    if ret == "HDRS":
        end = original.find(b"\r\n\r\n")
        original = original[: end + 2] if end >= 0 else original
        if not original.endswith(b"\r\n"):
            original += b"\r\n"
        part3_type = "text/rfc822-headers"
    else:
        part3_type = "message/rfc822"
    crlf = "\r\n"
    out = crlf.join(headers) + crlf + crlf + "This is a MIME-encapsulated message." + crlf + crlf
    out += f"--{boundary}{crlf}Content-Description: Notification{crlf}Content-Type: text/plain; charset=utf-8{crlf}"
    out += f"Content-Transfer-Encoding: 8bit{crlf}{crlf}" + crlf.join(_clean(x) if x else "" for x in "\n".join(lines).split("\n")) + crlf
    out += f"{crlf}--{boundary}{crlf}Content-Description: Delivery report{crlf}Content-Type: message/delivery-status{crlf}{crlf}"
    out += crlf.join(status) + crlf
    out += f"{crlf}--{boundary}{crlf}Content-Description: Undelivered {'Message' if ret == 'FULL' else 'Message Headers'}"
    out += f"{crlf}Content-Type: {part3_type}{crlf}"
    if any(b > 127 for b in original):
        out += f"Content-Transfer-Encoding: 8bit{crlf}"
    out_bytes = (out + crlf).encode("utf-8") + original
    if not out_bytes.endswith(b"\r\n"):
        out_bytes += b"\r\n"
    return out_bytes + f"{crlf}--{boundary}--{crlf}".encode()
