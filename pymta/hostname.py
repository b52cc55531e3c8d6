"""Host and domain name syntax, in one place: the RFC 1035/1123 label grammar as regex fragments
(for the SMTP address grammar) and the check that turns a name into its ASCII (A-label) form."""

from __future__ import annotations

import re

import idna

LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # letters, digits, inner hyphens; 63 at most
LABEL_UTF8 = r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f]){0,61}(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
DOMAIN = rf"{LABEL}(?:\.{LABEL})*\.?"  # as written in SMTP (a trailing dot allowed)
DOMAIN_UTF8 = rf"{LABEL_UTF8}(?:\.{LABEL_UTF8})*\.?"
MAX_LENGTH = 253

_HOST_LABEL = re.compile(rf"^{LABEL}$")
_SERVICE_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")  # _smtp._tls, _mta-sts


def ascii_hostname(name: str, underscores: bool = False, error: type[Exception] = ValueError) -> str:
    """``name`` as lower-case A-labels without the trailing dot, or ``error`` saying why not.

    Internationalised names are converted (IDNA 2008 with UTS #46 mapping); with ``underscores``,
    DNS owner names such as ``_smtp._tls.example.org`` pass too.
    """
    text = name.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise error(f"not a valid host or domain name {name!r}: {e}") from None
    label = _SERVICE_LABEL if underscores else _HOST_LABEL
    if not 0 < len(text) <= MAX_LENGTH or not all(label.match(part) for part in text.split(".")):
        raise error(f"not a valid host or domain name {name!r}")
    return text
