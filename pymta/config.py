"""TOML configuration loaded into validated frozen dataclasses; every error names file, key and reason.

Each dataclass field is a config key; its ``metadata["conv"]`` turns the TOML value into the
field's value (or raises :class:`ConfigValueError` with the reason). Unknown keys, wrong types
and impossible values stop startup with one line: ``FILE: KEY: REASON``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/pymta/pymta.toml"


class ConfigError(Exception):
    """A configuration problem, already formatted as ``FILE: KEY: REASON``."""


class ConfigValueError(ValueError):
    """A value is not acceptable for its key (the loader adds file and key)."""


def default_config_path() -> str:
    """``$PYMTA_CONFIG``, else /etc/pymta/pymta.toml (the default of every pymta-* command)."""
    return os.environ.get("PYMTA_CONFIG") or DEFAULT_CONFIG_PATH


# -- converters -----------------------------------------------------------------------------

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


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )


def conv_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigValueError(f"expected a string, got {_type_name(value)}")
    return value


def conv_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigValueError(f"expected true or false, got {_type_name(value)}")
    return value


def conv_int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(f"expected an integer, got {_type_name(value)}")
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


def conv_list(item: Callable[[Any], Any], allow_single: bool = True) -> Callable[[Any], tuple]:
    """A list of items (a single item is accepted as a one-element list when ``allow_single``)."""

    def conv(value: Any) -> tuple:
        if allow_single and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise ConfigValueError(f"expected a list, got {_type_name(value)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ConfigValueError as e:
                raise ConfigValueError(f"item {i + 1}: {e}") from None
        return tuple(out)

    return conv


def conv_choice(*choices: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        text = conv_str(value)
        if text not in choices:
            raise ConfigValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return conv


def conv_table(key_conv: Callable[[Any], Any], value_conv: Callable[[Any], Any]) -> Callable[[Any], dict]:
    """A TOML table whose keys and values are converted (errors name the entry)."""

    def conv(value: Any) -> dict:
        if not isinstance(value, dict):
            raise ConfigValueError(f"expected a table, got {_type_name(value)}")
        out = {}
        for k, v in value.items():
            try:
                out[key_conv(k)] = value_conv(v)
            except ConfigValueError as e:
                raise ConfigValueError(f"{k}: {e}") from None
        return out

    return conv


def conv_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = conv_str(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigValueError(f"not an IP network (CIDR) {text!r}") from None


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def conv_hostname(value: Any) -> str:
    text = conv_str(value).strip().rstrip(".").lower()
    try:
        import idna

        ascii_name = idna.encode(text, uts46=True).decode("ascii") if not text.isascii() else text
    except idna.IDNAError as e:
        raise ConfigValueError(f"not a valid host or domain name {value!r}: {e}") from None
    if not _HOSTNAME.match(ascii_name):
        raise ConfigValueError(f"not a valid host or domain name {value!r}")
    return ascii_name


def conv_address(value: Any) -> str:
    """A mailbox ``local@domain``: local part kept, domain lower-cased (the form RCPT matching uses)."""
    text = conv_str(value).strip()
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise ConfigValueError(f"not a mail address {value!r}")
    return f"{local}@{conv_hostname(domain)}"


def conv_hostport(default_port: int | None = None) -> Callable[[Any], tuple[str, int]]:
    """``"host:port"``, ``"[host]:port"``, ``"[2001:db8::1]:25"``; port optional when a default is given."""

    def conv(value: Any) -> tuple[str, int]:
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
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ConfigValueError(f"bad port in {text!r}")
            port = int(port_text)
        elif default_port is not None:
            port = default_port
        else:
            raise ConfigValueError(f"expected host:port, got {text!r}")
        if not host or host == "[]":
            raise ConfigValueError(f"no host in {text!r}")
        return host, port

    return conv


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


def _key(
    conv: Callable[[Any], Any],
    default: Any = MISSING,
    factory: Callable[[], Any] | None = None,
    doc: str = "",
) -> Any:
    meta = {"conv": conv, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- the sections ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[str, ...] = _key(conv_list(conv_endpoint), ("tcp:2525:interface=127.0.0.1",))
    max_message_size: int = _key(conv_int(1024, 2**31), 36700160)
    max_recipients: int = _key(conv_int(1, 100000), 1000)
    max_errors: int = _key(conv_int(1, 1000), 10)
    command_timeout: float = _key(conv_duration(1), 300.0)
    data_timeout: float = _key(conv_duration(1), 600.0)  # inactivity in DATA/BDAT
    min_data_rate: float = _key(conv_byte_rate, 1024.0)  # DATA/BDAT average after its first 30 s; 0 = off
    max_session_time: float = _key(conv_duration(0), 1800.0)  # a connection's whole life; 0 = no cap
    max_connections: int = _key(conv_int(1, 100000), 1000)  # each of `processes` takes an equal share
    listen_tls: tuple[str, ...] = _key(conv_list(conv_endpoint), ())  # implicit TLS (port 465 style)
    greet_pause: float = _key(conv_duration(0), 0.0)  # early-talker check; 0 = off
    processes: int = _key(conv_int(1, 64), 1)  # listener processes sharing the `listen` sockets
    reverse_lookup: bool = _key(conv_bool, False)  # PTR (forward-confirmed) for Received and rdns ACLs


@dataclass(frozen=True)
class DomainsConfig:
    local: tuple[str, ...] = _key(conv_list(conv_hostname), ())
    mailboxes: tuple[str, ...] | None = _key(conv_list(conv_address), None)
    relay_from: tuple = _key(
        conv_list(conv_network), (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    )
    forward: tuple[str, ...] = _key(conv_list(conv_hostname), ())
    # where RCPT TO:<postmaster> (RFC 5321 §4.5.1) goes; default postmaster@<first local domain>
    postmaster: str | None = _key(conv_address, None)
    # "+": alice+tag@ is alice's mail (tried after the full address), Postfix's recipient_delimiter
    recipient_delimiter: str = _key(lambda v: conv_delimiter(v), "")


def conv_delimiter(value: Any) -> str:
    text = conv_str(value)
    if len(text) > 1 or (text and (text.isalnum() or text in '@."\\ ')):
        raise ConfigValueError(f'expected one character such as "+" or "-", got {text!r}')
    return text


@dataclass(frozen=True)
class AliasesConfig:
    """The classic aliases file (``name: target, target``) for the local domains."""

    file: str | None = _key(conv_path, None)
    max_depth: int = _key(conv_int(1, 100), 20)  # nesting of aliases and [virtual] entries
    max_expansion: int = _key(conv_int(1, 100000), 1000)  # addresses one recipient may become


@dataclass(frozen=True)
class SRSConfig:
    """Sender Rewriting Scheme for mail an alias forwards to another domain."""

    secret: str | None = _key(conv_str, None)
    domain: str | None = _key(conv_hostname, None)  # default: hostname
    max_age: float = _key(conv_duration(86400), 21 * 86400.0)  # how long a rewritten sender is honoured


def conv_quota_key(value: Any) -> str:
    text = conv_str(value).strip()
    return f"@{conv_hostname(text[1:])}" if text.startswith("@") else conv_address(text).lower()


@dataclass(frozen=True)
class QueueConfig:
    retry_initial: float = _key(conv_duration(1), 300.0)
    retry_max: float = _key(conv_duration(1), 4 * 3600.0)
    max_age: float = _key(conv_duration(60), 5 * 86400.0)
    delay_warning: float = _key(conv_duration(0), 4 * 3600.0)
    max_active: int = _key(conv_int(1, 100000), 200)
    greylist_retry: float = _key(conv_duration(1), 300.0)  # retry after a greylisting reply
    shutdown_grace: float = _key(conv_duration(0), 30.0)  # a stop waits this long for deliveries in flight
    fsync: bool = _key(conv_bool, True)
    min_free: int = _key(conv_size, 0)  # MAIL gets 452 4.3.1 unless this + 1.5 x max_message_size is free
    # false: this process only accepts into the queue (a listener-only process beside another
    # pymta process that delivers from the same queue directory).
    deliver: bool = _key(conv_bool, True)


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


@dataclass(frozen=True)
class MailboxConfig:
    """Local delivery: Maildirs under state_dir/mail (delimiter folders, quotas kept as Maildir++
    ``maildirsize``) or an LMTP server such as Dovecot (``transport``)."""

    delimiter_folders: bool = _key(conv_bool, False)  # alice+tag@ into alice's Maildir++ folder .tag
    quota: int = _key(conv_size, 0)  # per mailbox, octets; 0 = none
    # "alice@example.test" or "@example.test" (every mailbox of a domain) = "5GB"; "0" = none
    quotas: dict[str, int] = _key(conv_table(lambda k: conv_quota_key(k), conv_size), None)
    quota_action: str = _key(conv_choice("defer", "bounce"), "defer")  # at delivery: 452 4.2.2 or 552 5.2.2
    transport: str = _key(conv_mailbox_transport, "maildir")
    lmtp_timeout: float = _key(conv_duration(1), 300.0)  # each LMTP reply, the ones after the final dot too
    lmtp_connections: int = _key(conv_int(1, 1000), 10)  # concurrent LMTP connections
    lmtp_idle: float = _key(conv_duration(0), 30.0)  # an idle connection is kept this long for reuse


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


def conv_http_url(value: Any) -> str:
    url = conv_str(value).rstrip("/")
    if not re.match(r"^https?://[A-Za-z0-9.\[\]:-]+(:\d{1,5})?(/[!-~]*)?$", url):
        raise ConfigValueError(f"expected an http:// or https:// URL, got {value!r}")
    return url


SCAN_ACTIONS = ("accept", "tempfail")


@dataclass(frozen=True)
class MilterConfig:
    socket: str = _key(conv_milter_socket, "")
    timeout: float | None = _key(conv_duration(0.1), None)  # default: [scan] timeout
    on_error: str | None = _key(conv_choice(*SCAN_ACTIONS), None)  # default: [scan] on_error


@dataclass(frozen=True)
class ScanConfig:
    """Content scanning before the 250: rspamd's HTTP protocol and/or milters, in that order."""

    rspamd: str | None = _key(conv_http_url, None)  # e.g. "http://127.0.0.1:11333"
    timeout: float = _key(conv_duration(0.1), 60.0)  # one scanner's whole conversation for one message
    # what a scanner that is down, too slow or breaks its protocol means: accept (unscanned) or tempfail (451 4.7.1)
    on_error: str = _key(conv_choice(*SCAN_ACTIONS), "tempfail")
    milter: tuple[MilterConfig, ...] = ()


def _conv_scan(value: Any, where: str) -> ScanConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: scan: expected a table, got {_type_name(value)}")
    table = dict(value)
    milters = _table_array(MilterConfig, table.pop("milter", []), "scan.milter", where, "socket",
                           'needed ("inet:HOST:PORT" or "unix:/PATH")')  # fmt: skip
    import dataclasses

    return dataclasses.replace(_build_section(ScanConfig, table, "scan", where), milter=milters)


@dataclass(frozen=True)
class SendmailConfig:
    """The local submission socket ``pymta-sendmail`` talks to (SMTP; the kernel names the user)."""

    socket: str | None = _key(conv_path, None)  # e.g. "/run/pymta/sendmail.sock" (mode 0666)


# The SMTP client's stages (RFC 5321 §4.5.3.2), the keys of [outbound] timeouts.
CLIENT_TIMEOUT_STAGES = ("connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "data_block", "data_end",
                         "rset", "quit")  # fmt: skip


@dataclass(frozen=True)
class OutboundConfig:
    smarthost: tuple[str, int] | None = _key(conv_hostport(25), None)
    smtp_port: int = _key(conv_int(1, 65535), 25)
    source_address: str | None = _key(conv_str, None)
    max_connections: int = _key(conv_int(1, 100000), 100)
    max_connections_per_domain: int = _key(conv_int(1, 10000), 10)
    max_messages_per_connection: int = _key(conv_int(1, 100000), 100)
    max_recipients_per_transaction: int = _key(conv_int(1, 100000), 100)
    connect_timeout: float | None = _key(conv_duration(1), None)  # also timeouts.connect (default 30s)
    timeouts: dict[str, float] = _key(conv_table(conv_choice(*CLIENT_TIMEOUT_STAGES), conv_duration(1)), None)
    tls: str = _key(conv_choice("none", "opportunistic", "verify"), "opportunistic")
    tls_ca_file: str | None = _key(conv_path, None)
    tls_policy: dict[str, str] = _key(conv_table(conv_hostname, conv_choice("none", "opportunistic", "verify")), None)
    mta_sts: bool = _key(conv_bool, True)  # RFC 8461 for domains without a tls_policy entry
    mta_sts_port: int = _key(conv_int(1, 65535), 443)  # the policy host's HTTPS port: a test/lab setting


@dataclass(frozen=True)
class DNSConfig:
    servers: tuple[str, ...] | None = _key(conv_list(conv_str), None)
    timeout: float = _key(conv_duration(0.1), 5.0)
    dnssec: bool = _key(conv_bool, False)  # trust the AD bit of `servers` (a validating resolver): enables DANE


def conv_rate(value: Any) -> Any:
    from pymta.rate import parse_rate

    try:
        return parse_rate(value)
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


@dataclass(frozen=True)
class LimitsConfig:
    """Per-client limits for clients outside relay_from that are not authenticated."""

    connections_per_client: int = _key(conv_int(1, 100000), 50)
    message_rate: Any = _key(conv_rate, None)
    recipient_rate: Any = _key(conv_rate, None)


@dataclass(frozen=True)
class GreylistConfig:
    enabled: bool = _key(conv_bool, False)
    delay: float = _key(conv_duration(0), 300.0)
    expire: float = _key(conv_duration(60), 4 * 3600.0)
    lifetime: float = _key(conv_duration(60), 36 * 86400.0)


def conv_redis_url(value: Any) -> str:
    """``redis://host:port/db``, ``rediss://`` (TLS) or ``unix:/path/redis.sock``."""
    text = conv_str(value)
    if not re.match(r"^(rediss?://[^\s/]+(/\d{1,2})?/?|unix:/\S+)$", text):
        raise ConfigValueError(f"expected redis://HOST:PORT/DB, rediss://... or unix:/PATH, got {text!r}")
    return text


@dataclass(frozen=True)
class ClusterConfig:
    """Where state shared between the nodes of a cluster lives: ``local`` (this node only) or ``redis``."""

    backend: str = _key(conv_choice("local", "redis"), "local")
    redis: str = _key(conv_redis_url, "redis://127.0.0.1:6379/0")
    redis_password_file: str | None = _key(conv_path, None)
    node: str | None = _key(conv_str, None)  # unique per node; None: the host name
    timeout: float = _key(conv_duration(0.01), 0.5)  # per Redis call; past it the node goes local
    heartbeat: float = _key(conv_duration(0.1), 2.0)  # a node is alive while seen within 3 heartbeats
    lease_ttl: float = _key(conv_duration(1), 30.0)  # a dead node's connection leases lapse after this


@dataclass(frozen=True)
class FeedbackConfig:
    """Return-path tagging, feedback addresses and the suppression policy."""

    bounce_domain: str | None = _key(conv_hostname, None)
    secret: str | None = _key(conv_str, None)
    sender_domains: tuple[str, ...] = _key(conv_list(conv_hostname), ())  # () = every sender domain
    complaint_addresses: tuple[str, ...] = _key(conv_list(conv_address), ())
    reply_addresses: tuple[str, ...] = _key(conv_list(conv_address), ())
    reply_mailbox: str | None = _key(conv_address, None)  # a local mailbox keeping human replies
    unsubscribe: bool = _key(conv_bool, False)  # add RFC 8058 List-Unsubscribe headers
    suppression_db: str | None = _key(conv_path, None)  # default: state_dir/suppression.sqlite
    soft_bounce_threshold: int = _key(conv_int(1, 1000), 3)
    soft_bounce_window: float = _key(conv_duration(60), 7 * 86400.0)
    soft_bounce_suppress: float = _key(conv_duration(60), 30 * 86400.0)


@dataclass(frozen=True)
class TLSRPTConfig:
    """TLS reporting (RFC 8460): daily reports sent to the domains that ask (``enabled``), and the
    addresses where reports about our own domains arrive."""

    enabled: bool = _key(conv_bool, False)
    organization: str | None = _key(conv_str, None)  # default: hostname
    contact: str | None = _key(conv_str, None)  # default: postmaster@hostname
    report_addresses: tuple[str, ...] = _key(conv_list(conv_address), ())


@dataclass(frozen=True)
class TLSConfig:
    """The listeners' certificate (PEM chain) and key; reloaded on SIGHUP."""

    cert: str | None = _key(conv_path, None)
    key: str | None = _key(conv_path, None)


@dataclass(frozen=True)
class SubmissionConfig:
    """Authenticated submission: port 587 style (AUTH PLAIN/LOGIN after STARTTLS) or, on ``ssl:``
    endpoints, implicit TLS (port 465, RFC 8314); then relay."""

    listen: tuple[str, ...] = _key(conv_list(conv_endpoint), ())
    users_file: str | None = _key(conv_path, None)
    max_auth_failures: int = _key(conv_int(1, 100), 3)
    # "strict": MAIL FROM and From: must be addresses the user owns (users file, sender_login_maps)
    sender_login: str = _key(conv_choice("any", "strict"), "any")
    sender_login_maps: str | None = _key(conv_path, None)  # "sender user[,user]" lines, Postfix style


@dataclass(frozen=True)
class DNSBLConfig:
    zones: tuple[str, ...] = _key(conv_list(conv_hostname), ())
    reply: tuple[int, str, str] = _key(lambda v: conv_reply(v), (554, "5.7.1", "Service unavailable; client listed"))


@dataclass(frozen=True)
class ShapingLimitsConfig:
    connections: int | None = _key(conv_int(1, 10000), None)
    message_rate: Any = _key(conv_rate, None)
    messages_per_connection: int | None = _key(conv_int(1, 100000), None)
    recipients_per_message: int | None = _key(conv_int(1, 100000), None)
    window: Any = _key(lambda v: conv_window(v), None)  # "08:00-20:00" local time of `timezone`
    timezone: str | None = _key(lambda v: conv_timezone(v), None)
    connection_rate: Any = _key(conv_rate, None)
    retry_initial: float | None = _key(conv_duration(1), None)
    retry_max: float | None = _key(conv_duration(1), None)
    per_source: bool | None = _key(conv_bool, None)
    dead_site_pause: float | None = _key(conv_duration(0), None)  # default 600 s; 0: never suspend
    mx_suffix: tuple[str, ...] = _key(conv_list(conv_hostname), ())  # providers only


def conv_window(value: Any) -> tuple[int, int]:
    from pymta.rate import parse_window

    try:
        return parse_window(conv_str(value))
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


def conv_timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = conv_str(value)
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigValueError(f"unknown time zone {text!r}") from None
    return text


def conv_share(value: Any) -> float:
    from pymta.rate import parse_share

    try:
        return parse_share(value)
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


@dataclass(frozen=True)
class BackoffConfig:
    match: str = _key(lambda v: conv_pattern("/" + conv_str(v) + "/")[1:-1], "")
    pause: float = _key(conv_duration(0), 600.0)
    rate: float = _key(conv_share, 0.5)
    recover: float = _key(conv_duration(0), 3600.0)


@dataclass(frozen=True)
class ShapingConfig:
    default: ShapingLimitsConfig = field(default_factory=ShapingLimitsConfig)
    domain: dict[str, ShapingLimitsConfig] = field(default_factory=dict)
    provider: dict[str, ShapingLimitsConfig] = field(default_factory=dict)
    backoff: tuple[BackoffConfig, ...] = ()


def _table_array(cls: type, value: Any, prefix: str, where: str, required: str, missing: str) -> tuple:
    """An array of tables ``[[prefix]]``, each built as ``cls``; ``required`` must be set in each."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {prefix}: expected an array of tables [[{prefix}]]")
    out = []
    for i, table in enumerate(value):
        entry = _build_section(cls, table, f"{prefix}[{i + 1}]", where)
        if not getattr(entry, required):
            raise ConfigError(f"{where}: {prefix}[{i + 1}].{required}: {missing}")
        out.append(entry)
    return tuple(out)


def _conv_shaping(value: Any, where: str) -> ShapingConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: shaping: expected a table, got {_type_name(value)}")
    out: dict[str, Any] = {}
    for key, table in value.items():
        if key == "default":
            out["default"] = _build_section(ShapingLimitsConfig, table, "shaping.default", where)
        elif key in ("domain", "provider"):
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: shaping.{key}: expected tables [shaping.{key}.\"NAME\"]")
            built = {}
            for name, limits in table.items():
                entry = _build_section(ShapingLimitsConfig, limits, f"shaping.{key}.{name}", where)
                if key == "provider" and not entry.mx_suffix:
                    raise ConfigError(f"{where}: shaping.provider.{name}.mx_suffix: a provider needs MX suffixes")
                built[name.lower() if key == "domain" else name] = entry
            out[key] = built
        elif key == "backoff":
            out["backoff"] = _table_array(BackoffConfig, table, "shaping.backoff", where, "match",
                                          "a regular expression is needed")  # fmt: skip
        else:
            raise ConfigError(f"{where}: shaping.{key}: unknown key (known: backoff, default, domain, provider)")
    return ShapingConfig(**out)


def conv_date(value: Any) -> Any:
    import datetime as _dt

    if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
        return value
    try:
        return _dt.date.fromisoformat(conv_str(value))
    except ValueError:
        raise ConfigValueError(f"expected a date like \"2026-11-24\", got {value!r}") from None


@dataclass(frozen=True)
class SourceConfig:
    address: str = _key(conv_str, "")
    ehlo: str | None = _key(conv_hostname, None)
    warmup: tuple[int, ...] = _key(conv_list(conv_int(1, 10**9), allow_single=False), ())
    warmup_start: Any = _key(conv_date, None)
    warmup_provider: dict[str, tuple[int, ...]] = _key(
        conv_table(conv_str, conv_list(conv_int(1, 10**9), allow_single=False)), None
    )  # a ladder per provider of [shaping.provider]


@dataclass(frozen=True)
class PoolConfig:
    sources: dict[str, int] = _key(conv_table(conv_str, conv_int(0, 1000)), None)
    spill: bool = _key(conv_bool, False)


@dataclass(frozen=True)
class PoolSelectConfig:
    default: str | None = _key(conv_str, None)
    sender_domain: dict[str, str] = _key(conv_table(conv_hostname, conv_str), None)
    auth_user: dict[str, str] = _key(conv_table(conv_str, conv_str), None)


def _conv_named(cls: type, value: Any, section: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {section}: expected tables [{section}.NAME]")
    return {name: _build_section(cls, table, f"{section}.{name}", where) for name, table in value.items()}


@dataclass(frozen=True)
class WarmupConfig:
    """When a source's ladder holds (over a threshold) or steps back (twice over), judged daily."""

    bounce_rate: float = _key(lambda v: conv_share(v), 0.05)
    deferral_rate: float = _key(lambda v: conv_share(v), 0.20)
    complaint_rate: float = _key(lambda v: conv_share(v), 0.001)
    min_sample: int = _key(conv_int(1, 10**9), 20)


@dataclass(frozen=True)
class AuthConfig:
    """Sender authentication of inbound mail: SPF, DKIM, DMARC, ARC -> Authentication-Results."""

    verify: bool = _key(conv_bool, False)  # on by itself when an ACL or dmarc_reject needs verdicts
    authserv_id: str | None = _key(conv_hostname, None)  # default: hostname
    dmarc_reject: bool = _key(conv_bool, False)  # honour p=reject with 550 5.7.1
    dmarc_quarantine: str | None = _key(conv_address, None)  # p=quarantine: deliver here (default: a header)
    arc_seal: bool = _key(conv_bool, True)  # seal mail to [domains] forward with the [dkim] key


_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")


def conv_header_name(value: Any) -> str:
    text = conv_str(value).strip()
    if not _HEADER_NAME.match(text):
        raise ConfigValueError(f"not a header field name {value!r}")
    return text


DKIM_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References",
                "List-Unsubscribe", "List-Unsubscribe-Post", "MIME-Version", "Content-Type",
                "Content-Transfer-Encoding", "Feedback-ID")  # fmt: skip


@dataclass(frozen=True)
class DkimConfig:
    """``[dkim."example.com"]`` signs for that From domain and its subdomains (and for ``users``);
    ``[dkim.default]`` (with ``domain``, the d= it signs as) for senders without a key of their own."""

    selector: tuple[str, ...] = _key(conv_list(conv_str), ())  # several: one signature each
    key: tuple[str, ...] = _key(conv_list(conv_path), ())  # PEM, one per selector
    algorithm: tuple[str, ...] = _key(conv_list(conv_choice("rsa-sha256", "ed25519-sha256")), ())  # default: the key's
    headers: tuple[str, ...] = _key(conv_list(conv_header_name), DKIM_HEADERS)  # signed when present
    oversign: tuple[str, ...] = _key(conv_list(conv_header_name), ("From",))  # listed once more in h=
    canonicalization: str = _key(
        conv_choice("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"), "relaxed/relaxed"
    )
    domain: str | None = _key(conv_hostname, None)  # d=; default the table's name
    users: tuple[str, ...] = _key(conv_list(conv_str), ())  # authenticated users it signs for (no key of their own)


@dataclass(frozen=True)
class LogConfig:
    accounting: bool = _key(conv_bool, True)


@dataclass(frozen=True)
class StatsConfig:
    retention: float = _key(conv_duration(3600), 30 * 86400.0)  # per-minute time series for the dashboard


def _conv_routes(value: Any) -> dict[str, tuple[str, int]]:
    if not isinstance(value, dict):
        raise ConfigValueError(f'expected a table of "domain" = "host:port", got {_type_name(value)}')
    out = {}
    hostport = conv_hostport(25)
    for domain, target in value.items():
        try:
            out[conv_hostname(domain)] = hostport(target)
        except ConfigValueError as e:
            raise ConfigValueError(f"{domain}: {e}") from None
    return out


def _conv_virtual(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    """``[virtual]``: ``"user@domain"``, ``"@domain"`` (catch-all) or ``"user@"`` = address or list of
    addresses; an error names the file, the line of the entry and the key."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: virtual: expected a table of \"address\" = [\"address\", ...]")
    out: dict[str, tuple[str, ...]] = {}
    for key, targets in value.items():
        try:
            local, at, domain = key.strip().rpartition("@")
            if not at or (not local and not domain) or any(c in key for c in " \t,<>"):
                raise ConfigValueError('a key is "user@domain", "@domain" or "user@"')
            name = f"{local.lower()}@{conv_hostname(domain) if domain else ''}"
            items = conv_list(conv_address)(targets)
            if not items:
                raise ConfigValueError("no target address")
            if len(items) > 10000:
                raise ConfigValueError("more than 10000 targets")
        except ConfigValueError as e:
            raise ConfigError(f"{where}:{_line_of(where, key)}: virtual.{key}: {e}") from None
        out[name] = items
    return out


def _line_of(path: str, key: str) -> int:
    """The line of ``path`` where the TOML key ``key`` is written (0 when it cannot be found)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.lstrip().startswith((f'"{key}"', f"'{key}'", f"{key} ", f"{key}=")):
                    return number
    except OSError:
        pass
    return 0


# -- access-control lists ([[acl.<stage>]] rules) --------------------------------------------

ACL_STAGES = ("connect", "helo", "mail", "rcpt", "data")
ACL_ACTIONS = ("accept", "reject", "tempfail", "continue")
VERDICTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
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


def conv_bool_or_names(value: Any) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    return conv_list(conv_str)(value)


@dataclass(frozen=True)
class AclRule:
    """One rule: every matcher given must match; then ``action`` (with ``reply``) applies."""

    action: str = _key(conv_str, "continue")
    reply: tuple[int, str, str] | None = _key(conv_reply, None)
    client: tuple | None = _key(conv_list(conv_network), None)
    rdns: tuple[str, ...] | None = _key(conv_list(conv_pattern), None)
    helo: tuple[str, ...] | None = _key(conv_list(conv_pattern), None)
    auth: bool | tuple[str, ...] | None = _key(conv_bool_or_names, None)
    tls: bool | None = _key(conv_bool, None)
    sender: tuple[str, ...] | None = _key(conv_list(conv_pattern), None)
    recipient: tuple[str, ...] | None = _key(conv_list(conv_pattern), None)
    size: int | None = _key(conv_int(0), None)
    spf: tuple[str, ...] | None = _key(conv_list(lambda v: conv_choice(*VERDICTS)(v)), None)  # data stage only
    dkim: tuple[str, ...] | None = _key(conv_list(lambda v: conv_choice(*VERDICTS)(v)), None)
    dmarc: tuple[str, ...] | None = _key(conv_list(lambda v: conv_choice(*VERDICTS)(v)), None)
    arc: tuple[str, ...] | None = _key(conv_list(lambda v: conv_choice(*VERDICTS)(v)), None)
    comment: str = _key(conv_str, "")


def _conv_acl(value: Any, where: str) -> dict[str, tuple[AclRule, ...]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: acl: expected tables [[acl.STAGE]], got {_type_name(value)}")
    out: dict[str, tuple[AclRule, ...]] = {}
    for stage, rules in value.items():
        if stage not in ACL_STAGES:
            raise ConfigError(f"{where}: acl.{stage}: unknown stage (known: {', '.join(ACL_STAGES)})")
        if not isinstance(rules, list):
            raise ConfigError(f"{where}: acl.{stage}: expected an array of tables [[acl.{stage}]]")
        built = []
        for i, rule in enumerate(rules):
            prefix = f"acl.{stage}[{i + 1}]"
            r = _build_section(AclRule, rule, prefix, where)
            if r.action not in ACL_ACTIONS:
                raise ConfigError(
                    f"{where}: {prefix}.action: must be one of {', '.join(ACL_ACTIONS)}, got {r.action!r}"
                )
            if r.reply is not None:
                wanted = {"reject": "5", "tempfail": "4"}.get(r.action)
                if wanted is None:
                    raise ConfigError(
                        f"{where}: {prefix}.reply: only reject and tempfail rules carry a reply"
                    )
                if str(r.reply[0])[0] != wanted:
                    raise ConfigError(f"{where}: {prefix}.reply: a {r.action} reply must be {wanted}xx")
            if r.recipient is not None and stage in ("connect", "helo", "mail"):
                raise ConfigError(
                    f"{where}: {prefix}.recipient: recipients are not known at the {stage} stage"
                )
            if r.size is not None and stage != "data" and stage != "mail":
                raise ConfigError(
                    f"{where}: {prefix}.size: the size is known at the mail (SIZE=) and data stages only"
                )
            for method in ("spf", "dkim", "dmarc", "arc"):
                if getattr(r, method) is not None and stage != "data":
                    raise ConfigError(f"{where}: {prefix}.{method}: sender verdicts are known at the data stage only")
            built.append(r)
        out[stage] = tuple(built)
    return out


_DEFAULT_MESSAGE_RATE = conv_rate("600/min, burst=100")
_DEFAULT_RECIPIENT_RATE = conv_rate("6000/min, burst=1000")

def conv_https_url(value: Any) -> str:
    url = conv_str(value).rstrip("/")
    if not re.match(r"^https://[A-Za-z0-9.-]+(:\d{1,5})?(/[!-~]*)?$", url):
        raise ConfigValueError(f"expected an https:// URL (RFC 8058 one-click needs HTTPS), got {value!r}")
    return url


@dataclass(frozen=True)
class HTTPConfig:
    """The HTTP service: admin and injection API plus /metrics on ``listen``, one-click
    unsubscribe on ``public_listen`` (reached by receivers as ``public_url``)."""

    listen: tuple[str, ...] = _key(conv_list(conv_endpoint), ())
    tokens_file: str | None = _key(conv_path, None)  # NAME:SCOPES:SHA256 lines (pymta-token)
    public_listen: tuple[str, ...] = _key(conv_list(conv_endpoint), ())
    public_url: str | None = _key(conv_https_url, None)
    metrics_auth: bool = _key(conv_bool, False)  # /metrics needs a "read" token
    max_body: int = _key(conv_int(1024, 1 << 30), 50 * 1024 * 1024)
    template_timeout: float = _key(conv_duration(0.01), 2.0)  # per recipient
    metric_campaigns: tuple[str, ...] | None = _key(conv_list(conv_str), None)  # campaigns with their own label
    metric_tenants: tuple[str, ...] | None = _key(conv_list(conv_str), None)


def conv_webhook_url(value: Any) -> str:
    url = conv_str(value)
    if not re.match(r"^https?://[A-Za-z0-9.\[\]:-]+(/[!-~]*)?$", url):
        raise ConfigValueError(f"expected an http:// or https:// URL, got {value!r}")
    return url


@dataclass(frozen=True)
class WebhookConfig:
    """One ``[[webhooks]]`` endpoint: events POSTed as signed JSON, at least once, in order."""

    name: str = _key(conv_str, "")
    url: str = _key(conv_webhook_url, "")
    secret: str | None = _key(conv_str, None)
    secret_file: str | None = _key(conv_path, None)
    events: tuple[str, ...] | None = _key(conv_list(conv_str), None)  # None = every type
    batch_size: int = _key(conv_int(1, 1000), 100)
    linger: float = _key(conv_duration(0.0, 60.0), 1.0)  # wait this long for a not-full batch to fill
    timeout: float = _key(conv_duration(0.1), 10.0)
    max_age: float = _key(conv_duration(1), 3 * 86400.0)
    retry_initial: float = _key(conv_duration(0.01), 5.0)
    retry_max: float = _key(conv_duration(0.01), 600.0)


def _conv_webhooks(value: Any, where: str) -> tuple[WebhookConfig, ...]:
    from pymta.events import EVENT_TYPES

    if not isinstance(value, list):
        raise ConfigError(f"{where}: webhooks: expected an array of tables [[webhooks]]")
    out: list[WebhookConfig] = []
    for i, table in enumerate(value):
        prefix = f"webhooks[{i + 1}]"
        hook = _build_section(WebhookConfig, table, prefix, where)
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", hook.name):
            raise ConfigError(f"{where}: {prefix}.name: needed, letters, digits, '.', '_' or '-' (at most 64)")
        if hook.name in {h.name for h in out}:
            raise ConfigError(f"{where}: {prefix}.name: {hook.name!r} is used twice")
        if not hook.url:
            raise ConfigError(f"{where}: {prefix}.url: needed")
        if bool(hook.secret) == bool(hook.secret_file):
            raise ConfigError(f"{where}: {prefix}.secret: give secret or secret_file (one of them)")
        if hook.secret is not None and len(hook.secret.encode()) < 16:
            raise ConfigError(f"{where}: {prefix}.secret: at least 16 characters")
        unknown = sorted(set(hook.events or ()) - set(EVENT_TYPES))
        if unknown:
            raise ConfigError(f"{where}: {prefix}.events: unknown event type {unknown[0]!r} "
                              f"(known: {', '.join(EVENT_TYPES)})")  # fmt: skip
        if hook.retry_max < hook.retry_initial:
            raise ConfigError(f"{where}: {prefix}.retry_max: must not be shorter than retry_initial")
        out.append(hook)
    return tuple(out)


@dataclass(frozen=True)
class TrackingConfig:
    """Open and click tracking of injected HTML mail (off unless ``enabled``)."""

    enabled: bool = _key(conv_bool, False)
    opens: bool = _key(conv_bool, True)
    clicks: bool = _key(conv_bool, True)
    campaigns: tuple[str, ...] | None = _key(conv_list(conv_str), None)  # None = every campaign
    secret: str | None = _key(conv_str, None)  # default: feedback.secret


_SECTIONS: dict[str, type] = {
    "smtp": SMTPConfig,
    "domains": DomainsConfig,
    "queue": QueueConfig,
    "mailbox": MailboxConfig,
    "sendmail": SendmailConfig,
    "outbound": OutboundConfig,
    "dns": DNSConfig,
    "log": LogConfig,
    "stats": StatsConfig,
    "limits": LimitsConfig,
    "greylist": GreylistConfig,
    "feedback": FeedbackConfig,
    "tls": TLSConfig,
    "tlsrpt": TLSRPTConfig,
    "submission": SubmissionConfig,
    "dnsbl": DNSBLConfig,
    "warmup": WarmupConfig,
    "http": HTTPConfig,
    "auth": AuthConfig,
    "aliases": AliasesConfig,
    "srs": SRSConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}


@dataclass(frozen=True)
class Config:
    path: str
    hostname: str = "localhost"
    state_dir: str = "var"
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    limits: LimitsConfig = field(
        default_factory=lambda: LimitsConfig(
            message_rate=_DEFAULT_MESSAGE_RATE, recipient_rate=_DEFAULT_RECIPIENT_RATE
        )
    )
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    tlsrpt: TLSRPTConfig = field(default_factory=TLSRPTConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    dnsbl: DNSBLConfig = field(default_factory=DNSBLConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    pool_select: PoolSelectConfig = field(default_factory=PoolSelectConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    dkim: dict[str, DkimConfig] = field(default_factory=dict)
    aliases: AliasesConfig = field(default_factory=AliasesConfig)
    srs: SRSConfig = field(default_factory=SRSConfig)
    virtual: dict[str, tuple[str, ...]] = field(default_factory=dict)  # [virtual] "key" = ["address", ...]
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    webhooks: tuple[WebhookConfig, ...] = ()
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    routes: dict[str, tuple[str, int]] = field(default_factory=dict)
    acl: dict[str, tuple[AclRule, ...]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.state_dir, "queue")

    @property
    def mail_dir(self) -> str:
        return os.path.join(self.state_dir, "mail")

    @property
    def log_dir(self) -> str:
        return os.path.join(self.state_dir, "log")

    @property
    def suppression_db(self) -> str:
        return self.feedback.suppression_db or os.path.join(self.state_dir, "suppression.sqlite")

    @property
    def postmaster(self) -> str:
        """The mailbox for ``RCPT TO:<postmaster>`` and postmaster@ every local domain."""
        return self.domains.postmaster or f"postmaster@{(self.domains.local or (self.hostname,))[0]}"

    @property
    def control_socket(self) -> str:
        return os.path.join(self.state_dir, "control.sock")


_TOP_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "hostname": conv_hostname,
    "state_dir": conv_path,
    "routes": _conv_routes,
}

# Sections other rooms read as free tables (validated by their owners at wiring time).
PASSTHROUGH_SECTIONS: frozenset[str] = frozenset()


def _build_section(cls: type, table: Any, prefix: str, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {prefix}: expected a table, got {_type_name(table)}")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where}: {prefix}.{key}: unknown key (known: {', '.join(sorted(known))})")
        try:
            values[key] = f.metadata["conv"](value)
        except ConfigValueError as e:
            raise ConfigError(f"{where}: {prefix}.{key}: {e}") from None
    if cls is LimitsConfig:
        values.setdefault("message_rate", _DEFAULT_MESSAGE_RATE)
        values.setdefault("recipient_rate", _DEFAULT_RECIPIENT_RATE)
    return cls(**values)


def load_config(path: str, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` with one line ``FILE: KEY: REASON``.

    ``overrides`` maps dotted keys (``"smtp.listen"``) to TOML-typed values applied on top.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read configuration: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    for dotted, value in (overrides or {}).items():
        table = data
        *parents, last = dotted.split(".")
        for p in parents:
            table = table.setdefault(p, {})
        table[last] = value
    return build_config(data, path)


def build_config(data: dict[str, Any], path: str = "<config>") -> Config:
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            values[key] = _build_section(_SECTIONS[key], value, key, path)
        elif key in _TOP_CONVERTERS:
            try:
                values[key] = _TOP_CONVERTERS[key](value)
            except ConfigValueError as e:
                raise ConfigError(f"{path}: {key}: {e}") from None
        elif key == "acl":
            values[key] = _conv_acl(value, path)
        elif key == "shaping":
            values[key] = _conv_shaping(value, path)
        elif key == "scan":
            values[key] = _conv_scan(value, path)
        elif key == "sources":
            values[key] = _conv_named(SourceConfig, value, "sources", path)
        elif key == "pools":
            values[key] = _conv_named(PoolConfig, value, "pools", path)
        elif key == "pool_select":
            values[key] = _build_section(PoolSelectConfig, value, "pool_select", path)
        elif key == "dkim":
            values[key] = _conv_dkim(value, path)
        elif key == "virtual":
            values[key] = _conv_virtual(value, path)
        elif key == "webhooks":
            values[key] = _conv_webhooks(value, path)
        elif key in PASSTHROUGH_SECTIONS:
            continue
        else:
            known = sorted([*_SECTIONS, *_TOP_CONVERTERS, *PASSTHROUGH_SECTIONS, "acl", "shaping", "sources", "pools",
                            "pool_select", "dkim", "virtual", "webhooks", "scan"])  # fmt: skip
            raise ConfigError(f"{path}: {key}: unknown key (known: {', '.join(known)})")
    if "state_dir" not in values:
        values["state_dir"] = conv_path("var")
    config = Config(path=path, raw=data, **values)
    _check_consistency(config)
    return config


def _conv_dkim(value: Any, where: str) -> dict[str, DkimConfig]:
    out = {}
    for name, entry in _conv_named(DkimConfig, value, "dkim", where).items():
        prefix = f"{where}: dkim.{name}"
        if not entry.selector or not entry.key:
            raise ConfigError(f"{prefix}.{'key' if entry.selector else 'selector'}: needed")
        if len(entry.key) != len(entry.selector):
            raise ConfigError(f"{prefix}.key: one key per selector ({len(entry.selector)})")
        if entry.algorithm and len(entry.algorithm) != len(entry.selector):
            raise ConfigError(f"{prefix}.algorithm: one algorithm per selector ({len(entry.selector)})")
        if "from" not in {h.lower() for h in entry.headers}:
            raise ConfigError(f"{prefix}.headers: From must be signed")
        for what in ("headers", "oversign"):
            ours = [h for h in getattr(entry, what) if h.lower().startswith("x-pymta-")]
            if ours:  # pymta removes or adds these after signing: a signature over them would break
                raise ConfigError(f"{prefix}.{what}: {ours[0]} is pymta's own header, never signed")
        if name == "default" and entry.domain is None:
            raise ConfigError(f"{prefix}.domain: needed (the d= domain that signs for other senders)")
        try:
            key = name if name == "default" else conv_hostname(name)
        except ConfigValueError as e:
            raise ConfigError(f"{prefix}: {e}") from None
        out[key] = entry if entry.domain or key == "default" else dataclasses.replace(entry, domain=key)
    return out


def _check_consistency(config: Config) -> None:
    """Cross-key rules: impossible combinations are errors naming the key."""
    where = config.path
    q = config.queue
    if q.retry_max < q.retry_initial:
        raise ConfigError(f"{where}: queue.retry_max: must not be shorter than queue.retry_initial")
    if q.max_age < q.retry_initial:
        raise ConfigError(f"{where}: queue.max_age: must not be shorter than queue.retry_initial")
    if config.outbound.max_connections_per_domain > config.outbound.max_connections:
        raise ConfigError(
            f"{where}: outbound.max_connections_per_domain: must not exceed outbound.max_connections"
        )
    if config.outbound.connect_timeout is not None and "connect" in (config.outbound.timeouts or {}):
        raise ConfigError(f"{where}: outbound.timeouts: connect: also set as outbound.connect_timeout; keep one")
    overlap = set(config.domains.local) & set(config.domains.forward)
    if overlap:
        raise ConfigError(f"{where}: domains.forward: {sorted(overlap)[0]} is also in domains.local")
    if config.domains.mailboxes is not None:
        for address in config.domains.mailboxes:
            domain = address.rpartition("@")[2]
            if domain not in config.domains.local:
                raise ConfigError(f"{where}: domains.mailboxes: {address} is not in a domains.local domain")
    fb = config.feedback
    if fb.bounce_domain and (not fb.secret or len(fb.secret.encode()) < 16):
        raise ConfigError(f"{where}: feedback.secret: needed with feedback.bounce_domain, at least 16 characters")
    if bool(config.tls.cert) != bool(config.tls.key):
        raise ConfigError(f"{where}: tls.{'key' if config.tls.cert else 'cert'}: tls.cert and tls.key go together")
    if (config.smtp.listen_tls or config.submission.listen) and not config.tls.cert:
        raise ConfigError(f"{where}: tls.cert: needed by smtp.listen_tls and submission.listen")
    if config.submission.listen and not config.submission.users_file:
        raise ConfigError(f"{where}: submission.users_file: needed with submission.listen")
    for name, src in config.sources.items():
        import ipaddress as _ip

        try:
            _ip.ip_address(src.address)
        except ValueError:
            raise ConfigError(f"{where}: sources.{name}.address: not an IP address {src.address!r}") from None
        for provider in src.warmup_provider or {}:
            if provider not in config.shaping.provider:
                raise ConfigError(f"{where}: sources.{name}.warmup_provider.{provider}: no [shaping.provider.{provider}]")
        if (src.warmup or src.warmup_provider) and src.warmup_start is None:
            raise ConfigError(f"{where}: sources.{name}.warmup_start: needed with a warm-up ladder")
    for name, pool in config.pools.items():
        for member in pool.sources or {}:
            if member not in config.sources:
                raise ConfigError(f"{where}: pools.{name}.sources: no source named {member!r}")
        if not pool.sources:
            raise ConfigError(f"{where}: pools.{name}.sources: a pool needs sources")
    sel = config.pool_select
    for key, target in [("default", sel.default), *[(f"sender_domain.{k}", v) for k, v in (sel.sender_domain or {}).items()],
                        *[(f"auth_user.{k}", v) for k, v in (sel.auth_user or {}).items()]]:  # fmt: skip
        if target is not None and target not in config.pools:
            raise ConfigError(f"{where}: pool_select.{key}: no pool named {target!r}")
    if not config.smtp.listen:
        raise ConfigError(f"{where}: smtp.listen: at least one listener is needed")
    if config.http.public_listen and not (fb.bounce_domain and fb.unsubscribe):
        raise ConfigError(f"{where}: http.public_listen: one-click unsubscribe needs feedback.bounce_domain and "
                          "feedback.unsubscribe = true")  # fmt: skip
    if config.srs.secret is not None and len(config.srs.secret.encode()) < 16:
        raise ConfigError(f"{where}: srs.secret: at least 16 characters")
    if config.http.public_listen and not config.http.public_url:
        raise ConfigError(f"{where}: http.public_url: needed with http.public_listen")
    tr = config.tracking
    if tr.enabled and not (config.http.public_listen and config.http.public_url):
        raise ConfigError(f"{where}: tracking.enabled: needs http.public_listen and http.public_url")
    if tr.enabled and len((tr.secret or fb.secret or "").encode()) < 16:
        raise ConfigError(f"{where}: tracking.secret: needed (or feedback.secret), at least 16 characters")
