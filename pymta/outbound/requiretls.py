"""REQUIRETLS (RFC 8689) on the sending side: whether a message demands verified TLS on every hop
(the MAIL FROM parameter, kept in the envelope) or waives the recipient's TLS policies (a
``TLS-Required: No`` header field, §5)."""

from __future__ import annotations

import re
from typing import Any

MAX_HEADER_SCAN = 256 * 1024  # the header block is looked at up to this many octets
_TLS_REQUIRED_NO = re.compile(rb"(?im)^TLS-Required[ \t]*:[ \t]*No[ \t]*\r?$")


def requiretls_of(envelope: Any) -> bool:
    """The message was received with ``MAIL FROM:<...> REQUIRETLS``."""
    return bool(envelope.extra.get("requiretls"))


def tls_optional(body: bytes) -> bool:
    """The header section has ``TLS-Required: No``."""
    head = body[:MAX_HEADER_SCAN]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    if end >= 0:
        head = head[: end + 2]
    return _TLS_REQUIRED_NO.search(head) is not None
