"""Dates in message headers (Date:, Received:, DSN fields): RFC 5322 date-time text.

One place formats them, and a busy server stamps the same second many times over, so the text of
the last whole second asked for is kept (formatting costs more than the rest of a Received line).
"""

from __future__ import annotations

from email.utils import formatdate

_last: dict[bool, tuple[int, str]] = {}


def header_date(seconds: float, localtime: bool = False) -> str:
    """``seconds`` (wall clock) as RFC 5322 text: in the local zone with ``localtime``, else UTC
    written ``-0000`` (RFC 5322 §3.3: no claim about the local zone)."""
    whole = int(seconds)
    cached = _last.get(localtime)
    if cached is not None and cached[0] == whole:
        return cached[1]
    text = formatdate(whole, localtime=localtime)
    _last[localtime] = (whole, text)
    return text
