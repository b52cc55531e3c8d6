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
_RETURN_PATH = re.compile(r"^([bu])-([0-9A-Z]{16,32})-([a-z2-7]{16})$", re.IGNORECASE)
BOUNCE = "b"  # token kinds: a return path for bounces ...
UNSUBSCRIBE = "u"  # ... and an RFC 8058 one-click unsubscribe address
_TRACE = re.compile(r"^\s*([0-9A-Z]{16,32})\.([a-z2-7]+)\.([a-z2-7]{16})\s*$", re.IGNORECASE)


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

    def mac(self, qid: str, recipient: str, kind: str = BOUNCE) -> str:
        digest = hmac.new(self.secret, f"{kind}\0{qid}\0{recipient.lower()}".encode(), hashlib.sha256).digest()
        return _b32(digest)[:_MAC_LEN]

    def return_path(self, qid: str, recipient: str, kind: str = BOUNCE) -> str:
        return f"{kind}-{qid}-{self.mac(qid, recipient, kind)}@{self.bounce_domain}"

    def unsubscribe_address(self, qid: str, recipient: str) -> str:
        return self.return_path(qid, recipient, UNSUBSCRIBE)

    def trace_value(self, qid: str, recipient: str) -> str:
        return f"{qid}.{_b32(recipient.lower().encode())}.{self.mac(qid, recipient, 't')}"

    def parse_return_path(self, address: str) -> tuple[str, str, str] | None:
        """(kind, qid, mac) from an address on the bounce domain, or None (not ours / malformed)."""
        local, _, domain = address.rpartition("@")
        if domain.lower().rstrip(".") != self.bounce_domain:
            return None
        m = _RETURN_PATH.match(local)
        return (m.group(1).lower(), m.group(2).upper(), m.group(3).lower()) if m else None

    def verify(self, qid: str, mac: str, recipient: str, kind: str = BOUNCE) -> bool:
        return hmac.compare_digest(self.mac(qid, recipient, kind), mac.lower())

    def match_recipients(
        self, address: str, candidates: list[str], kind: str = BOUNCE
    ) -> tuple[str, list[str]] | None:
        """For mail to ``address``: (qid, the candidates its ``kind`` token was made for), or None."""
        parsed = self.parse_return_path(address)
        if parsed is None or parsed[0] != kind:
            return None
        _, qid, mac = parsed
        matched = [c.lower() for c in candidates if self.verify(qid, mac, c, kind)]
        return (qid, matched) if matched else None

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
