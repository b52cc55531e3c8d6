"""Sender Rewriting Scheme: the envelope sender of mail an alias forwards to another domain.

Forwarded mail keeps SPF passing downstream when its envelope sender is in our domain:
``user@origin`` becomes ``SRS0=HHHHHHHH=TT=origin=user@srs_domain`` (Shevek's scheme, as
libsrs2, Mail::SRS and postsrsd write it), where ``TT`` is the day (base32, modulo 1024) and
``HHHHHHHH`` an HMAC-SHA1 (base64, compared case-insensitively) over day, domain and local part.
A sender that is already another forwarder's SRS0 address becomes ``SRS1=HHHHHHHH=forwarder==...``.
A bounce to one of ours is reversed to the original sender; a forged or expired one is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HASH_LENGTH = 8
DAY = 86400.0
_TAGS = ("SRS0", "SRS1")


class SRSError(ValueError):
    """An address in SRS form that is not a genuine, current one of ours (the reason is the text)."""


def is_srs(local_part: str) -> bool:
    return len(local_part) > 5 and local_part[:4].upper() in _TAGS and local_part[4] in "=+-"


class SRS:
    """Rewrites and reverses senders for one secret and one SRS domain."""

    def __init__(self, secret: str | bytes, domain: str, max_age: float = 21 * DAY) -> None:
        self.secret = secret.encode() if isinstance(secret, str) else secret
        if len(self.secret) < 16:
            raise ValueError("the SRS secret must be at least 16 octets")
        self.domain = domain.lower().rstrip(".")
        self.max_days = max(1, int(max_age // DAY))

    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "".join(parts).lower().encode("utf-8", "surrogateescape"), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def _check_hash(self, given: str, *parts: str) -> None:
        if not hmac.compare_digest(given.lower(), self._hash(*parts).lower()):
            raise SRSError("SRS address with a bad signature")

    @staticmethod
    def _day(now: float) -> str:
        day = int(now // DAY) % 1024
        return _BASE32[day >> 5] + _BASE32[day & 31]

    def _check_day(self, stamp: str, now: float) -> None:
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in _BASE32 for c in stamp):
            raise SRSError("SRS address with a bad time stamp")
        then = (_BASE32.index(stamp[0]) << 5) | _BASE32.index(stamp[1])
        age = (int(now // DAY) - then) % 1024
        if age > self.max_days:
            raise SRSError("SRS address expired")

    def forward(self, sender: str, now: float) -> str:
        """The envelope sender for forwarding mail from ``sender`` (the null sender stays null)."""
        local, at, domain = sender.rpartition("@")
        if not at or not local:
            return sender
        domain = domain.lower().rstrip(".")
        if domain == self.domain:
            return sender  # ours already (SPF passes as it is)
        if is_srs(local):
            tag, rest = local[:4].upper(), local[5:]
            if tag == "SRS1":  # keep the first forwarder: SRS1=HHH=first==...@other -> SRS1=H'=first==...@us
                _, sep, tail = rest.partition("=")
                first, sep2, inner = tail.partition("==")
                if sep and sep2 and first:
                    return f"SRS1={self._hash(first, inner)}={first}=={inner}@{self.domain}"
            else:  # another forwarder's SRS0: wrap it
                return f"SRS1={self._hash(domain, rest)}={domain}=={rest}@{self.domain}"
        stamp = self._day(now)
        return f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}@{self.domain}"

    def reverse(self, address: str, now: float) -> str:
        """The address a bounce to our SRS ``address`` goes to; :class:`SRSError` when not genuine."""
        local, _, domain = address.rpartition("@")
        if domain.lower().rstrip(".") != self.domain or not is_srs(local):
            raise SRSError("not an SRS address of this host")
        tag, rest = local[:4].upper(), local[5:]
        if tag == "SRS0":
            parts = rest.split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            given, stamp, origin, user = parts
            self._check_hash(given, stamp, origin, user)
            self._check_day(stamp, now)
            return f"{user}@{origin}"
        given, sep, tail = rest.partition("=")
        first, sep2, inner = tail.partition("==")
        if not (sep and sep2 and first and inner):
            raise SRSError("malformed SRS1 address")
        self._check_hash(given, first, inner)
        return f"SRS0={inner}@{first}"
