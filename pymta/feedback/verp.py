"""Signed return paths and trace headers: which message and which recipient a bounce or a
complaint is about, unforgeable without the secret (so backscatter never suppresses anyone).

Return path: ``b-<qid>-<mac>@<bounce_domain>`` (``u-`` for one-click unsubscribe) (at most 64 octets of local part), where the MAC
(HMAC-SHA256, truncated) covers the queue id and the lower-cased recipient: a bounce is taken only
for a recipient it names and the MAC matches, so a genuine token cannot be replayed to suppress
someone else. Trace header ``X-Pymta-Trace: <qid>.<base32 recipient>.<mac>`` carries the same for
complaint reports (ARF) that lose the envelope.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

TRACE_HEADER = "X-Pymta-Trace"
_MAC_LEN = 16  # base32 characters (80 bits)
_RETURN_PATH = re.compile(r"^([bu])-([0-9A-Z]{16,32})-([a-z2-7]{16})(?:=([a-z0-9.-]{1,253}))?$", re.IGNORECASE)
BOUNCE = "b"  # token kinds: a return path for bounces ...
UNSUBSCRIBE = "u"  # ... and an RFC 8058 one-click unsubscribe address
_UNSUBSCRIBE_TOKEN = re.compile(r"^([0-9A-Z]{16,32})\.([a-z2-7]{1,520})\.([a-z2-7]{0,410})\.([a-z2-7]{16})$", re.I)
_TRACE = re.compile(r"^\s*([0-9A-Z]{16,32})\.([a-z2-7]+)\.([a-z2-7]{16})\s*$", re.IGNORECASE)


def looks_like_return_path(local: str) -> bool:
    """Whether ``local`` has the shape of a return-path token (the RCPT stage accepts it on the bounce
    domain; the MAC is checked with the secret when the feedback is processed)."""
    return _RETURN_PATH.match(local) is not None


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    text = text.upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


class Tagger:
    """Makes and checks return paths and trace headers for one secret and bounce domain."""

    def __init__(self, secret: bytes | str, bounce_domain: str) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if len(secret) < 16:
            raise ValueError("the feedback secret must be at least 16 octets")
        self.secret = secret
        self.bounce_domain = bounce_domain.lower().rstrip(".")

    def mac(self, qid: str, recipient: str, kind: str = BOUNCE, scope: str = "") -> str:
        message = f"{kind}\0{qid}\0{recipient.lower()}\0{scope.lower()}".encode()
        return _b32(hmac.new(self.secret, message, hashlib.sha256).digest())[:_MAC_LEN]

    def return_path(self, qid: str, recipient: str, kind: str = BOUNCE, scope: str = "") -> str:
        suffix = f"={scope.lower()}" if scope else ""
        return f"{kind}-{qid}-{self.mac(qid, recipient, kind, scope)}{suffix}@{self.bounce_domain}"

    def unsubscribe_address(self, qid: str, recipient: str, sender_domain: str) -> str:
        """The mailto target of RFC 8058 one-click: suppresses ``recipient`` for ``sender_domain``."""
        return self.return_path(qid, recipient, UNSUBSCRIBE, sender_domain)

    def unsubscribe_token(self, qid: str, recipient: str, sender_domain: str) -> str:
        """The path token of the RFC 8058 HTTPS one-click URI: ``qid.b32(recipient).b32(domain).mac``,
        the same MAC as the mailto form, so either unsubscribes exactly that recipient."""
        rcpt = _b32(recipient.lower().encode())
        scope = _b32(sender_domain.lower().encode())
        return f"{qid}.{rcpt}.{scope}.{self.mac(qid, recipient, UNSUBSCRIBE, sender_domain)}"

    def parse_unsubscribe_token(self, token: str) -> tuple[str, str, str] | None:
        """(qid, recipient, sender domain) from a genuine one-click token, else None."""
        m = _UNSUBSCRIBE_TOKEN.match(token or "")
        if not m:
            return None
        try:
            recipient = _unb32(m.group(2)).decode("utf-8")
            scope = _unb32(m.group(3)).decode("utf-8") if m.group(3) else ""
        except (ValueError, UnicodeDecodeError):
            return None
        qid = m.group(1).upper()
        return (qid, recipient, scope) if self.verify(qid, m.group(4), recipient, UNSUBSCRIBE, scope) else None

    def trace_value(self, qid: str, recipient: str) -> str:
        return f"{qid}.{_b32(recipient.lower().encode())}.{self.mac(qid, recipient, 't')}"

    def parse_return_path(self, address: str) -> tuple[str, str, str, str] | None:
        """(kind, qid, mac, scope) from an address on the bounce domain, or None (not ours / malformed)."""
        local, _, domain = address.rpartition("@")
        if domain.lower().rstrip(".") != self.bounce_domain:
            return None
        m = _RETURN_PATH.match(local)
        if not m:
            return None
        return m.group(1).lower(), m.group(2).upper(), m.group(3).lower(), (m.group(4) or "").lower()

    def verify(self, qid: str, mac: str, recipient: str, kind: str = BOUNCE, scope: str = "") -> bool:
        return hmac.compare_digest(self.mac(qid, recipient, kind, scope), mac.lower())

    def match_recipients(
        self, address: str, candidates: list[str], kind: str = BOUNCE
    ) -> tuple[str, list[str], str] | None:
        """For mail to ``address``: (qid, the candidates its ``kind`` token was made for, scope), or None."""
        parsed = self.parse_return_path(address)
        if parsed is None or parsed[0] != kind:
            return None
        _, qid, mac, scope = parsed
        matched = [c.lower() for c in candidates if self.verify(qid, mac, c, kind, scope)]
        return (qid, matched, scope) if matched else None

    def parse_trace(self, value: str) -> tuple[str, str] | None:
        """(qid, recipient) from a genuine trace header value, else None."""
        m = _TRACE.match(value or "")
        if not m:
            return None
        try:
            recipient = _unb32(m.group(2)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        qid = m.group(1).upper()
        return (qid, recipient) if self.verify(qid, m.group(3), recipient, "t") else None
