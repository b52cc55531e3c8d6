"""The grammar of SMTP arguments: RFC 5321 paths, HELO names, ESMTP parameters and RFC 3461 xtext.

Pure functions of text, shared by the server (parsing what a client sends) and the client
(encoding what it sends); no protocol state lives here.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

from pymta.hostname import DOMAIN as _DOMAIN
from pymta.hostname import DOMAIN_UTF8 as _DOMAIN_UTF8
from pymta.smtp.replies import Reply

if TYPE_CHECKING:
    from pymta.smtp.server import AcceptedRecipient, Transaction

# -- addresses ---------------------------------------------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT_UTF8 = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_DOT_STRING_UTF8 = rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_UTF8 = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"'
_LITERAL = r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]"
_MAILBOX = re.compile(rf"^({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})$")
_MAILBOX_UTF8 = re.compile(rf"^({_DOT_STRING_UTF8}|{_QUOTED_UTF8})@({_DOMAIN_UTF8}|{_LITERAL})$")
_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
_HELO_NAME = re.compile(r"^(?:[\x21-\x7e]|[^\x00-\x7f])+$")


def parse_path(text: str, utf8: bool = False, allow_postmaster: bool = False) -> str:
    """Parse an RFC 5321 ``Path`` (``<...>``) and return the mailbox.

    Returns ``""`` for the null path ``<>``; otherwise ``local@domain`` with the domain
    lower-cased (address literals kept as written, ``[IPv6:...]`` with its tag), a trailing dot
    removed, the local part exactly as given (quoted local parts keep their quotes). A source
    route (``<@a,@b:user@dom>``) is dropped, as RFC 5321 §4.1.1.3 allows. With
    ``allow_postmaster`` the bare ``<postmaster>`` (any case) is returned as ``"postmaster"``.
    Raises ValueError for anything else, including non-ASCII without ``utf8``.
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise ValueError("address must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        return ""
    if inner.startswith("@"):
        m = _ROUTE.match(inner)
        if not m:
            raise ValueError("bad source route")
        inner = inner[m.end() :]
    if allow_postmaster and inner.lower() == "postmaster":
        return "postmaster"
    if not utf8 and not inner.isascii():
        raise UnicodeError("non-ASCII address without SMTPUTF8")
    m = (_MAILBOX_UTF8 if utf8 else _MAILBOX).match(inner)
    if not m:
        raise ValueError("bad address syntax")
    local, domain = m.group(1), m.group(2)
    if len(local.encode()) > 64 or len(inner.encode()) > 254:
        raise ValueError("address too long")
    if domain.startswith("["):
        if not _valid_literal(domain):
            raise ValueError("bad address literal")
        return f"{local}@{domain}"
    return f"{local}@{domain.rstrip('.').lower()}"


def _valid_literal(literal: str) -> bool:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def helo_name(argument: str) -> str | None:
    """The name a HELO/EHLO argument gives (its first word, printable), or None when it gives none."""
    name = argument.split(" ", 1)[0] if argument else ""
    return name if name and _HELO_NAME.match(name) else None


# -- xtext (RFC 3461 §4) -----------------------------------------------------------------------

_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext -> text; ValueError if malformed."""
    if not _XTEXT.match(text):
        raise ValueError("bad xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Text -> RFC 3461 xtext (``+`` and ``=``, controls and non-ASCII as ``+XX`` per octet)."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in text
    )


# -- MAIL and RCPT parameters ------------------------------------------------------------------

_PARAM_KEY = re.compile(r"^[A-Z0-9][A-Z0-9-]*$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9-]+$")
_NOTIFY_VALUES = ("NEVER", "SUCCESS", "FAILURE", "DELAY")


def parse_params(words: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` / ``KEY`` words -> {KEY (upper): value ("" when none)}; ValueError on repeats."""
    params: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        key = key.upper()
        if not key or not _PARAM_KEY.match(key):
            raise ValueError(f"bad parameter {word[:40]!r}")
        if key in params:
            raise ValueError(f"duplicate parameter {key}")
        params[key] = value
    return params


def split_path_and_params(argument: str) -> tuple[str, list[str]]:
    """``<a b@x> P=1`` -> ("<a b@x>", ["P=1"]): the path ends at the first ``>`` outside quotes."""
    argument = argument.strip()
    if not argument.startswith("<"):
        word, *rest = argument.split()
        return word, rest
    in_quotes = escaped = False
    for i, ch in enumerate(argument):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            return argument[: i + 1], argument[i + 1 :].split()
    raise ValueError("unterminated path")


def apply_mail_params(
    txn: Transaction, params: dict[str, str], max_size: int, requiretls_offered: bool, tls: bool
) -> Reply | None:
    """Check the MAIL FROM parameters and note them on ``txn``; the refusal, or None when all are good."""
    for key, value in params.items():
        if key == "SIZE":
            if not value.isdigit() or len(value) > 20:
                return Reply(501, "5.5.4", "Bad SIZE parameter")
            txn.declared_size = int(value)
            if txn.declared_size > max_size:
                return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                return Reply(555, "5.5.4", "Unsupported BODY type")
            txn.body_type = value.upper()
        elif key == "SMTPUTF8":
            if value:
                return Reply(555, "5.5.4", "SMTPUTF8 takes no value")
            txn.smtputf8 = True
        elif key == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                return Reply(501, "5.5.4", "RET must be FULL or HDRS")
            txn.ret = value.upper()
        elif key == "ENVID":
            try:
                txn.envid = xtext_decode(value)
            except ValueError:
                return Reply(501, "5.5.4", "Bad ENVID (xtext)")
            if not 0 < len(value) <= 100:
                return Reply(501, "5.5.4", "Bad ENVID length")
        elif key == "AUTH":
            continue  # RFC 4954 AUTH= on MAIL: accepted, not trusted
        elif key == "REQUIRETLS" and requiretls_offered:  # RFC 8689 §4.1
            if value:
                return Reply(555, "5.5.4", "REQUIRETLS takes no value")
            if not tls:
                return Reply(530, "5.7.10", "REQUIRETLS needs TLS")
        else:
            return Reply(555, "5.5.4", f"Unsupported parameter {key}")
    return None


def apply_rcpt_params(accepted: AcceptedRecipient, params: dict[str, str]) -> Reply | None:
    """Check the RCPT TO parameters (DSN NOTIFY and ORCPT) and note them on ``accepted``; the
    refusal, or None when all are good."""
    for key, value in params.items():
        if key == "NOTIFY":
            items = tuple(v.upper() for v in value.split(","))
            if not value or any(i not in _NOTIFY_VALUES for i in items):
                return Reply(501, "5.5.4", "Bad NOTIFY parameter")
            if "NEVER" in items and len(items) > 1:
                return Reply(501, "5.5.4", "NOTIFY=NEVER cannot be combined")
            if len(set(items)) != len(items):
                return Reply(501, "5.5.4", "Repeated NOTIFY value")
            accepted.notify = items
        elif key == "ORCPT":
            addr_type, sep, xtext = value.partition(";")
            if not sep or not _ADDR_TYPE.match(addr_type) or not xtext:
                return Reply(501, "5.5.4", "Bad ORCPT parameter")
            try:
                accepted.orcpt = f"{addr_type.lower()};{xtext_decode(xtext)}"
            except ValueError:
                return Reply(501, "5.5.4", "Bad ORCPT parameter (xtext)")
        else:
            return Reply(555, "5.5.4", f"Unsupported parameter {key}")
    return None
