"""The forms configuration values take: durations, sizes, rates, host names, addresses, endpoints,
URLs, replies... Each ``conv_*`` turns a TOML value into the value a key holds or raises
:class:`ConfigValueError` with the reason; :mod:`pymta.config` names the file and key."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Annotated, Any, cast

from pymta.hostname import ascii_hostname


class ConfigValueError(ValueError):
    """A value is not acceptable for its key (the loader adds file and key)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"1w"``, ``"250ms"`` (a bare number is seconds) -> seconds."""
    if isinstance(value, bool):
        raise ConfigValueError('expected a duration like "30s", "5m", "4h" or "5d"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigValueError(f'expected a duration like "30s", "5m", "4h" or "5d", got {value!r}')
    if seconds < 0:
        raise ConfigValueError("a duration cannot be negative")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3}


def conv_size(value: Any) -> int:
    """``"100MB"``, ``"64KiB"``, ``"2GB"`` (binary units: KB = 1024 octets; a bare number is octets)."""
    if isinstance(value, bool):
        raise ConfigValueError('expected a size like "100MB" or "64KB"')
    if isinstance(value, int):
        octets = float(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        octets = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    else:
        raise ConfigValueError(f'expected a size like "100MB" or "64KB", got {value!r}')
    if octets < 0:
        raise ConfigValueError("a size cannot be negative")
    return int(octets)


def conv_byte_rate(value: Any) -> float:
    """``"1KB/s"``, ``"60KB/min"`` -> octets per second (a bare number is octets per second; 0 = off)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if value == "0":
        return 0.0
    size, sep, period = value.partition("/") if isinstance(value, str) else ("", "", "")
    seconds = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60}.get(period.strip().lower())
    if not sep or seconds is None:
        raise ConfigValueError(f'expected a data rate like "1KB/s", got {value!r}')
    return conv_size(size) / seconds


def type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )


def conv_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigValueError(f"expected a string, got {type_name(value)}")
    return value


def conv_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigValueError(f"expected true or false, got {type_name(value)}")
    return value


def conv_int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(f"expected an integer, got {type_name(value)}")
        if minimum is not None and value < minimum:
            raise ConfigValueError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigValueError(f"must be at most {maximum}, got {value}")
        return value

    return conv


def conv_duration(minimum: float = 0.0, maximum: float | None = None) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            raise ConfigValueError(f"must be at least {minimum:g}s, got {value!r}")
        if maximum is not None and seconds > maximum:
            raise ConfigValueError(f"must be at most {maximum:g}s, got {value!r}")
        return seconds

    return conv


def conv_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = conv_str(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigValueError(f"not an IP network (CIDR) {text!r}") from None


def conv_hostname(value: Any) -> str:
    return ascii_hostname(conv_str(value), error=ConfigValueError)


def conv_address(value: Any) -> str:
    """A mailbox ``local@domain``: local part kept, domain lower-cased (the form RCPT matching uses)."""
    text = conv_str(value).strip()
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise ConfigValueError(f"not a mail address {value!r}")
    return f"{local}@{conv_hostname(domain)}"


def conv_hostport(value: Any, default_port: int = 25) -> tuple[str, int]:
    """``"host:port"``, ``"[host]:port"``, ``"[2001:db8::1]:25"``; the port defaults to 25."""
    text = conv_str(value).strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigValueError(f"unbalanced brackets in {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigValueError(f"expected host:port, got {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise ConfigValueError(f"bad port in {text!r}")
    if not host or host == "[]":
        raise ConfigValueError(f"no host in {text!r}")
    return host, int(port_text) if port_text else default_port


def conv_endpoint(value: Any) -> str:
    """A Twisted server endpoint string (``tcp:2525:interface=127.0.0.1``); checked for form here,
    fully when the listener starts."""
    text = conv_str(value).strip()
    kind, _, rest = text.partition(":")
    if kind not in ("tcp", "tcp6", "ssl", "unix", "systemd") or not rest:
        raise ConfigValueError(f'not a server endpoint string like "tcp:2525:interface=127.0.0.1": {text!r}')
    if kind in ("tcp", "tcp6", "ssl"):
        port = rest.split(":", 1)[0]
        if port.startswith("port="):
            port = port[5:]
        if not port.isdigit() or int(port) > 65535:
            raise ConfigValueError(f"bad port in endpoint {text!r}")
    return text


def conv_path(value: Any) -> str:
    """A path; relative ones resolve against the working directory (as twistd's --logfile does)."""
    text = conv_str(value)
    if not text or "\x00" in text:
        raise ConfigValueError("not a usable path")
    return os.path.abspath(os.path.expanduser(text))


def conv_delimiter(value: Any) -> str:
    text = conv_str(value)
    if len(text) > 1 or (text and (text.isalnum() or text in '@."\\ ')):
        raise ConfigValueError(f'expected one character such as "+" or "-", got {text!r}')
    return text


def conv_quota_key(value: Any) -> str:
    text = conv_str(value).strip()
    return f"@{conv_hostname(text[1:])}" if text.startswith("@") else conv_address(text).lower()


def parse_lmtp_transport(text: str) -> tuple[str, str, int] | None:
    """``lmtp:unix:/path`` -> ("unix", "/path", 0); ``lmtp:tcp:HOST:PORT`` (``[v6]:PORT`` too) ->
    ("tcp", HOST, PORT); None when ``text`` is not an LMTP transport."""
    kind, _, rest = text.partition(":")
    if kind != "lmtp":
        return None
    family, _, where = rest.partition(":")
    if family == "unix" and where.startswith("/"):
        return ("unix", where, 0)
    return _tcp_host_port(where) if family == "tcp" else None


def _tcp_host_port(where: str) -> tuple[str, str, int] | None:
    """``HOST:PORT`` or ``[v6]:PORT`` -> ("tcp", HOST, PORT), None if malformed."""
    host, _, port = where.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host and port.isdigit() and 0 < int(port) < 65536:
        return ("tcp", host, int(port))
    return None


def conv_mailbox_transport(value: Any) -> str:
    text = conv_str(value)
    if text != "maildir" and parse_lmtp_transport(text) is None:
        raise ConfigValueError(f'expected "maildir", "lmtp:unix:/PATH" or "lmtp:tcp:HOST:PORT", got {text!r}')
    return text


def parse_milter_socket(text: str) -> tuple[str, str, int] | None:
    """Postfix/Sendmail milter addresses: ``inet:HOST:PORT``, ``inet6:HOST:PORT`` (or ``inet:[v6]:PORT``),
    ``unix:/path`` (``local:/path``) -> ("tcp", HOST, PORT) or ("unix", PATH, 0); None if malformed."""
    kind, _, rest = text.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return ("unix", rest, 0)
    return _tcp_host_port(rest) if kind in ("inet", "inet6") else None


def conv_milter_socket(value: Any) -> str:
    text = conv_str(value)
    if parse_milter_socket(text) is None:
        raise ConfigValueError(f'expected "inet:HOST:PORT" or "unix:/PATH", got {text!r}')
    return text


def _url(pattern: str, expected: str, strip_slash: bool = True) -> Callable[[Any], str]:
    form = re.compile(pattern)

    def conv(value: Any) -> str:
        url = conv_str(value).rstrip("/") if strip_slash else conv_str(value)
        if not form.match(url):
            raise ConfigValueError(f"expected {expected}, got {value!r}")
        return url

    return conv


conv_http_url = _url(r"^https?://[A-Za-z0-9.\[\]:-]+(:\d{1,5})?(/[!-~]*)?$", "an http:// or https:// URL")
conv_https_url = _url(r"^https://[A-Za-z0-9.-]+(:\d{1,5})?(/[!-~]*)?$",
                      "an https:// URL (RFC 8058 one-click needs HTTPS)")  # fmt: skip
conv_webhook_url = _url(r"^https?://[A-Za-z0-9.\[\]:-]+(/[!-~]*)?$", "an http:// or https:// URL", strip_slash=False)


def conv_redis_url(value: Any) -> str:
    """``redis://host:port/db``, ``rediss://`` (TLS) or ``unix:/path/redis.sock``."""
    text = conv_str(value)
    if not re.match(r"^(rediss?://[^\s/]+(/\d{1,2})?/?|unix:/\S+)$", text):
        raise ConfigValueError(f"expected redis://HOST:PORT/DB, rediss://... or unix:/PATH, got {text!r}")
    return text


def _parsed_by(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A converter from a parser of :mod:`pymta.rate` that raises ValueError(reason)."""

    def conv(value: Any) -> Any:
        try:
            return parse(value)
        except ValueError as e:
            raise ConfigValueError(str(e)) from None

    return conv


def conv_rate(value: Any) -> Any:
    from pymta.rate import parse_rate

    return _parsed_by(parse_rate)(value)


def conv_window(value: Any) -> tuple[int, int]:
    from pymta.rate import parse_window

    return cast(tuple[int, int], _parsed_by(parse_window)(conv_str(value)))


def conv_share(value: Any) -> float:
    from pymta.rate import parse_share

    return cast(float, _parsed_by(parse_share)(value))


def conv_timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = conv_str(value)
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigValueError(f"unknown time zone {text!r}") from None
    return text


def conv_date(value: Any) -> datetime.date:
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    try:
        return datetime.date.fromisoformat(conv_str(value))
    except ValueError:
        raise ConfigValueError(f"expected a date like \"2026-11-24\", got {value!r}") from None


_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")


def conv_header_name(value: Any) -> str:
    text = conv_str(value).strip()
    if not _HEADER_NAME.match(text):
        raise ConfigValueError(f"not a header field name {value!r}")
    return text


_REPLY = re.compile(r"^([245]\d\d)(?:\s+([245]\.\d{1,3}\.\d{1,3}))?(?:\s+(.*))?$")


def conv_reply(value: Any) -> tuple[int, str, str]:
    """``"550 5.7.1 Not from there"`` -> (550, "5.7.1", "Not from there"); the enhanced code is needed."""
    text = conv_str(value).strip()
    m = _REPLY.match(text)
    if not m or not m.group(2):
        raise ConfigValueError(f'expected a reply like "550 5.7.1 text", got {text!r}')
    if m.group(1)[0] != m.group(2)[0]:
        raise ConfigValueError(f"reply code and enhanced code disagree in {text!r}")
    return int(m.group(1)), m.group(2), m.group(3) or ""


def conv_pattern(value: Any) -> str:
    """A string matcher: exact text, or ``/regex/`` (checked here)."""
    text = conv_str(value)
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        try:
            re.compile(text[1:-1])
        except re.error as e:
            raise ConfigValueError(f"bad regular expression {text!r}: {e}") from None
    return text


def conv_regex(value: Any) -> str:
    """A regular expression written without slashes."""
    return conv_pattern("/" + conv_str(value) + "/")[1:-1]


# The forms most keys take.
Duration = Annotated[float, parse_duration]
Size = Annotated[int, conv_size]
Hostname = Annotated[str, conv_hostname]
Address = Annotated[str, conv_address]
Path = Annotated[str, conv_path]
Endpoint = Annotated[str, conv_endpoint]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, conv_network]
Pattern = Annotated[str, conv_pattern]
Rate = Annotated[Any, conv_rate]
Share = Annotated[float, conv_share]
Reply = Annotated[tuple[int, str, str], conv_reply]
