"""TOML configuration: a schema of frozen attrs classes that cattrs fills in; every error is one line
``FILE: KEY: REASON``.

How the schema reads
  * A section (``[smtp]``) is a class below; each of its keys is a field: the field's type says which
    TOML values it takes, its default what holds when the key is absent. Unknown keys are errors.
  * ``str``, ``bool`` and ``int`` are strict (no coercion). ``Annotated[T, conv]`` names the function
    that turns the TOML value into the field's value or raises :class:`ConfigValueError` with the
    reason (``conv_duration(1)``, ``conv_int(1, 100)``); :mod:`pymta.config_values` holds these
    converters and the aliases ``Duration``, ``Hostname``, ``Path``... of the common forms.
    ``Literal[...]`` is a choice of strings.
  * ``tuple[T, ...]`` is a TOML list (one bare value counts as a list of one), ``dict[K, V]`` a table
    whose keys are converted as ``K``. Of a section class, they are ``[[x]]`` arrays of tables and
    ``[x.NAME]`` named tables.
  * Rules that involve more than one key live in one place: :func:`_cross_key_errors`.

How to add a key
  1. Add a field to its section's class with a type and a default (and a comment saying what it does):
     ``greet_pause: Annotated[float, conv_duration(0)] = 0.0``. It is then accepted, checked and read
     as ``config.smtp.greet_pause``.
  2. A value of a new form: write ``conv_x(value) -> field value`` (raising ConfigValueError(reason))
     in pymta/config_values.py and use ``Annotated[T, conv_x]``.
  3. A rule tying it to another key: a ``yield KEY, REASON`` in :func:`_cross_key_errors`.
  4. A new section: a class, and a field on :class:`Config` (``name: Cls = attrs.Factory(Cls)``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal, cast, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from pymta.config_values import (
    Address,
    ConfigValueError,
    Duration,
    Endpoint,
    Hostname,
    Network,
    Path,
    Pattern,
    Rate,
    Reply,
    Share,
    Size,
    conv_bool,
    conv_byte_rate,
    conv_date,
    conv_delimiter,
    conv_duration,
    conv_header_name,
    conv_hostname,
    conv_hostport,
    conv_http_url,
    conv_https_url,
    conv_int,
    conv_mailbox_transport,
    conv_milter_socket,
    conv_path,
    conv_quota_key,
    conv_rate,
    conv_redis_url,
    conv_regex,
    conv_str,
    conv_timezone,
    conv_webhook_url,
    conv_window,
    type_name,
)

# Also read from here by other modules.
from pymta.config_values import parse_duration as parse_duration
from pymta.config_values import parse_lmtp_transport as parse_lmtp_transport
from pymta.config_values import parse_milter_socket as parse_milter_socket

DEFAULT_CONFIG_PATH = "/etc/pymta/pymta.toml"


class ConfigError(Exception):
    """A configuration problem, already formatted as ``FILE: KEY: REASON``."""


class _UnknownKey(ConfigValueError):
    def __init__(self, key: str, known: Iterable[str]) -> None:
        super().__init__(f"unknown key (known: {', '.join(sorted(known))})")
        self.key = key


class _NotTables(ConfigValueError):
    """A value that should be tables; the reason names the key, which only the loader knows."""

    def __init__(self, form: str) -> None:
        super().__init__(form)
        self.form = form


def default_config_path() -> str:
    """``$PYMTA_CONFIG``, else /etc/pymta/pymta.toml (the default of every pymta-* command)."""
    return os.environ.get("PYMTA_CONFIG") or DEFAULT_CONFIG_PATH


# -- converters of this schema's own forms (the common ones are in pymta.config_values) -------


def conv_bool_or_names(value: Any) -> bool | tuple[str, ...]:
    return value if isinstance(value, bool) else _schema.structure(value, tuple[str, ...])


def conv_ladder(value: Any) -> tuple[int, ...]:
    """A warm-up ladder: a list (never a bare number) of daily message counts."""
    if not isinstance(value, list):
        raise ConfigValueError(f"expected a list, got {type_name(value)}")
    return _schema.structure(value, tuple[Annotated[int, conv_int(1, 10**9)], ...])


ACL_STAGES = ("connect", "helo", "mail", "rcpt", "data")


def conv_acl_stage(value: Any) -> str:
    if value not in ACL_STAGES:
        raise ConfigValueError(f"unknown stage (known: {', '.join(ACL_STAGES)})")
    return str(value)


def conv_dkim_name(value: Any) -> str:
    """``[dkim.default]`` or ``[dkim."From domain"]``."""
    return "default" if value == "default" else conv_hostname(value)


def conv_virtual_key(value: Any) -> str:
    """``"user@domain"``, ``"@domain"`` (catch-all) or ``"user@"`` (that user in every local domain)."""
    local, at, domain = value.strip().rpartition("@")
    if not at or (not local and not domain) or any(c in value for c in " \t,<>"):
        raise ConfigValueError('a key is "user@domain", "@domain" or "user@"')
    return f"{local.lower()}@{conv_hostname(domain) if domain else ''}"


def conv_virtual_targets(value: Any) -> tuple[str, ...]:
    items: tuple[str, ...] = _schema.structure(value, tuple[Address, ...])
    if not items:
        raise ConfigValueError("no target address")
    if len(items) > 10000:
        raise ConfigValueError("more than 10000 targets")
    return items


TlsMode = Literal["none", "opportunistic", "verify"]
ScanAction = Literal["accept", "tempfail"]
Verdict = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
# The SMTP client's stages (RFC 5321 §4.5.3.2), the keys of [outbound] timeouts.
ClientStage = Literal["connect", "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "data_block", "data_end",
                      "rset", "quit"]  # fmt: skip
CLIENT_TIMEOUT_STAGES: tuple[str, ...] = get_args(ClientStage)
DKIM_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References",
                "List-Unsubscribe", "List-Unsubscribe-Post", "MIME-Version", "Content-Type",
                "Content-Transfer-Encoding", "Feedback-ID")  # fmt: skip
_DEFAULT_MESSAGE_RATE = conv_rate("600/min, burst=100")
_DEFAULT_RECIPIENT_RATE = conv_rate("6000/min, burst=1000")


# -- the sections ---------------------------------------------------------------------------


@attrs.frozen
class SMTPConfig:
    listen: tuple[Endpoint, ...] = ("tcp:2525:interface=127.0.0.1",)
    max_message_size: Annotated[int, conv_int(1024, 2**31)] = 36700160
    max_recipients: Annotated[int, conv_int(1, 100000)] = 1000
    max_errors: Annotated[int, conv_int(1, 1000)] = 10
    command_timeout: Annotated[float, conv_duration(1)] = 300.0
    data_timeout: Annotated[float, conv_duration(1)] = 600.0  # inactivity in DATA/BDAT
    min_data_rate: Annotated[float, conv_byte_rate] = 1024.0  # DATA/BDAT average after its first 30 s; 0 = off
    max_session_time: Duration = 1800.0  # a connection's whole life; 0 = no cap
    max_connections: Annotated[int, conv_int(1, 100000)] = 1000  # each of `processes` takes an equal share
    listen_tls: tuple[Endpoint, ...] = ()  # implicit TLS (port 465 style)
    greet_pause: Duration = 0.0  # early-talker check; 0 = off
    processes: Annotated[int, conv_int(1, 64)] = 1  # listener processes sharing the `listen` sockets
    reverse_lookup: bool = False  # PTR (forward-confirmed) for Received and rdns ACLs


@attrs.frozen
class DomainsConfig:
    local: tuple[Hostname, ...] = ()
    mailboxes: tuple[Address, ...] | None = None
    relay_from: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    forward: tuple[Hostname, ...] = ()
    # where RCPT TO:<postmaster> (RFC 5321 §4.5.1) goes; default postmaster@<first local domain>
    postmaster: Address | None = None
    # "+": alice+tag@ is alice's mail (tried after the full address), Postfix's recipient_delimiter
    recipient_delimiter: Annotated[str, conv_delimiter] = ""


@attrs.frozen
class AliasesConfig:
    """The classic aliases file (``name: target, target``) for the local domains."""

    file: Path | None = None
    max_depth: Annotated[int, conv_int(1, 100)] = 20  # nesting of aliases and [virtual] entries
    max_expansion: Annotated[int, conv_int(1, 100000)] = 1000  # addresses one recipient may become


@attrs.frozen
class SRSConfig:
    """Sender Rewriting Scheme for mail an alias forwards to another domain."""

    secret: str | None = None
    domain: Hostname | None = None  # default: hostname
    max_age: Annotated[float, conv_duration(86400)] = 21 * 86400.0  # how long a rewritten sender is honoured


@attrs.frozen
class QueueConfig:
    retry_initial: Annotated[float, conv_duration(1)] = 300.0
    retry_max: Annotated[float, conv_duration(1)] = 4 * 3600.0
    max_age: Annotated[float, conv_duration(60)] = 5 * 86400.0
    delay_warning: Duration = 4 * 3600.0
    max_active: Annotated[int, conv_int(1, 100000)] = 200
    greylist_retry: Annotated[float, conv_duration(1)] = 300.0  # retry after a greylisting reply
    shutdown_grace: Duration = 30.0  # a stop waits this long for deliveries in flight
    fsync: bool = True
    min_free: Size = 0  # MAIL gets 452 4.3.1 unless this + 1.5 x max_message_size is free
    # finished queue files kept in spare/ to be written over by new mail instead of unlinked and
    # created again (0: none)
    spare_files: Annotated[int, conv_int(0, 100000)] = 256
    # false: this process only accepts into the queue (a listener-only process beside another
    # pymta process that delivers from the same queue directory).
    deliver: bool = True


@attrs.frozen
class MailboxConfig:
    """Local delivery: Maildirs under state_dir/mail (delimiter folders, quotas kept as Maildir++
    ``maildirsize``) or an LMTP server such as Dovecot (``transport``)."""

    delimiter_folders: bool = False  # alice+tag@ into alice's Maildir++ folder .tag
    quota: Size = 0  # per mailbox, octets; 0 = none
    # "alice@example.test" or "@example.test" (every mailbox of a domain) = "5GB"; "0" = none
    quotas: dict[Annotated[str, conv_quota_key], Size] | None = None
    quota_action: Literal["defer", "bounce"] = "defer"  # at delivery: 452 4.2.2 or 552 5.2.2
    transport: Annotated[str, conv_mailbox_transport] = "maildir"
    lmtp_timeout: Annotated[float, conv_duration(1)] = 300.0  # each LMTP reply, the ones after the final dot too
    lmtp_connections: Annotated[int, conv_int(1, 1000)] = 10  # concurrent LMTP connections
    lmtp_idle: Duration = 30.0  # an idle connection is kept this long for reuse


@attrs.frozen
class MilterConfig:
    socket: Annotated[str, conv_milter_socket] = ""  # needed
    timeout: Annotated[float, conv_duration(0.1)] | None = None  # default: [scan] timeout
    on_error: ScanAction | None = None  # default: [scan] on_error


@attrs.frozen
class ScanConfig:
    """Content scanning before the 250: rspamd's HTTP protocol and/or milters, in that order."""

    rspamd: Annotated[str, conv_http_url] | None = None  # e.g. "http://127.0.0.1:11333"
    timeout: Annotated[float, conv_duration(0.1)] = 60.0  # one scanner's whole conversation for one message
    # what a scanner that is down, too slow or breaks its protocol means: accept (unscanned) or tempfail (451 4.7.1)
    on_error: ScanAction = "tempfail"
    milter: tuple[MilterConfig, ...] = ()


@attrs.frozen
class SendmailConfig:
    """The local submission socket ``pymta-sendmail`` talks to (SMTP; the kernel names the user)."""

    socket: Path | None = None  # e.g. "/run/pymta/sendmail.sock" (mode 0666)


@attrs.frozen
class OutboundConfig:
    smarthost: Annotated[tuple[str, int], conv_hostport] | None = None
    smtp_port: Annotated[int, conv_int(1, 65535)] = 25
    source_address: str | None = None
    max_connections: Annotated[int, conv_int(1, 100000)] = 100
    max_connections_per_domain: Annotated[int, conv_int(1, 10000)] = 10
    max_messages_per_connection: Annotated[int, conv_int(1, 100000)] = 100
    max_recipients_per_transaction: Annotated[int, conv_int(1, 100000)] = 100
    connect_timeout: Annotated[float, conv_duration(1)] | None = None  # also timeouts.connect (default 30s)
    timeouts: dict[ClientStage, Annotated[float, conv_duration(1)]] | None = None
    tls: TlsMode = "opportunistic"
    tls_ca_file: Path | None = None
    tls_policy: dict[Hostname, TlsMode] | None = None
    mta_sts: bool = True  # RFC 8461 for domains without a tls_policy entry
    mta_sts_port: Annotated[int, conv_int(1, 65535)] = 443  # the policy host's HTTPS port: a test/lab setting


@attrs.frozen
class DNSConfig:
    servers: tuple[str, ...] | None = None
    timeout: Annotated[float, conv_duration(0.1)] = 5.0
    dnssec: bool = False  # trust the AD bit of `servers` (a validating resolver): enables DANE


@attrs.frozen
class LimitsConfig:
    """Per-client limits for clients outside relay_from that are not authenticated."""

    connections_per_client: Annotated[int, conv_int(1, 100000)] = 50
    message_rate: Rate = _DEFAULT_MESSAGE_RATE
    recipient_rate: Rate = _DEFAULT_RECIPIENT_RATE


@attrs.frozen
class GreylistConfig:
    enabled: bool = False
    delay: Duration = 300.0
    expire: Annotated[float, conv_duration(60)] = 4 * 3600.0
    lifetime: Annotated[float, conv_duration(60)] = 36 * 86400.0


@attrs.frozen
class ClusterConfig:
    """Where state shared between the nodes of a cluster lives: ``local`` (this node only) or ``redis``."""

    backend: Literal["local", "redis"] = "local"
    redis: Annotated[str, conv_redis_url] = "redis://127.0.0.1:6379/0"
    redis_password_file: Path | None = None
    node: str | None = None  # unique per node; None: the host name
    timeout: Annotated[float, conv_duration(0.01)] = 0.5  # per Redis call; past it the node goes local
    heartbeat: Annotated[float, conv_duration(0.1)] = 2.0  # a node is alive while seen within 3 heartbeats
    lease_ttl: Annotated[float, conv_duration(1)] = 30.0  # a dead node's connection leases lapse after this


@attrs.frozen
class FeedbackConfig:
    """Return-path tagging, feedback addresses and the suppression policy."""

    bounce_domain: Hostname | None = None
    secret: str | None = None
    sender_domains: tuple[Hostname, ...] = ()  # () = every sender domain
    complaint_addresses: tuple[Address, ...] = ()
    reply_addresses: tuple[Address, ...] = ()
    reply_mailbox: Address | None = None  # a local mailbox keeping human replies
    unsubscribe: bool = False  # add RFC 8058 List-Unsubscribe headers
    suppression_db: Path | None = None  # default: state_dir/suppression.sqlite
    soft_bounce_threshold: Annotated[int, conv_int(1, 1000)] = 3
    soft_bounce_window: Annotated[float, conv_duration(60)] = 7 * 86400.0
    soft_bounce_suppress: Annotated[float, conv_duration(60)] = 30 * 86400.0


@attrs.frozen
class TLSRPTConfig:
    """TLS reporting (RFC 8460): daily reports sent to the domains that ask (``enabled``), and the
    addresses where reports about our own domains arrive."""

    enabled: bool = False
    organization: str | None = None  # default: hostname
    contact: str | None = None  # default: postmaster@hostname
    report_addresses: tuple[Address, ...] = ()


@attrs.frozen
class TLSConfig:
    """The listeners' certificate (PEM chain) and key; reloaded on SIGHUP."""

    cert: Path | None = None
    key: Path | None = None


@attrs.frozen
class SubmissionConfig:
    """Authenticated submission: port 587 style (AUTH PLAIN/LOGIN after STARTTLS) or, on ``ssl:``
    endpoints, implicit TLS (port 465, RFC 8314); then relay."""

    listen: tuple[Endpoint, ...] = ()
    users_file: Path | None = None
    max_auth_failures: Annotated[int, conv_int(1, 100)] = 3
    # "strict": MAIL FROM and From: must be addresses the user owns (users file, sender_login_maps)
    sender_login: Literal["any", "strict"] = "any"
    sender_login_maps: Path | None = None  # "sender user[,user]" lines, Postfix style


@attrs.frozen
class DNSBLConfig:
    zones: tuple[Hostname, ...] = ()
    reply: Reply = (554, "5.7.1", "Service unavailable; client listed")


@attrs.frozen
class ShapingLimitsConfig:
    connections: Annotated[int, conv_int(1, 10000)] | None = None
    message_rate: Rate = None
    messages_per_connection: Annotated[int, conv_int(1, 100000)] | None = None
    recipients_per_message: Annotated[int, conv_int(1, 100000)] | None = None
    window: Annotated[Any, conv_window] = None  # "08:00-20:00" local time of `timezone`
    timezone: Annotated[str, conv_timezone] | None = None
    connection_rate: Rate = None
    retry_initial: Annotated[float, conv_duration(1)] | None = None
    retry_max: Annotated[float, conv_duration(1)] | None = None
    per_source: bool | None = None
    dead_site_pause: Duration | None = None  # default 600 s; 0: never suspend
    mx_suffix: tuple[Hostname, ...] = ()  # providers only


@attrs.frozen
class BackoffConfig:
    match: Annotated[str, conv_regex] = ""  # needed
    pause: Duration = 600.0
    rate: Share = 0.5
    recover: Duration = 3600.0


@attrs.frozen
class ShapingConfig:
    default: ShapingLimitsConfig = attrs.Factory(ShapingLimitsConfig)
    domain: dict[Annotated[str, str.lower], ShapingLimitsConfig] = attrs.Factory(dict)
    provider: dict[str, ShapingLimitsConfig] = attrs.Factory(dict)
    backoff: tuple[BackoffConfig, ...] = ()


@attrs.frozen
class SourceConfig:
    address: str = ""
    ehlo: Hostname | None = None
    warmup: Annotated[tuple[int, ...], conv_ladder] = ()
    warmup_start: Annotated[datetime.date, conv_date] | None = None
    # a ladder per provider of [shaping.provider]
    warmup_provider: dict[str, Annotated[tuple[int, ...], conv_ladder]] | None = None


@attrs.frozen
class PoolConfig:
    sources: dict[str, Annotated[int, conv_int(0, 1000)]] | None = None
    spill: bool = False


@attrs.frozen
class PoolSelectConfig:
    default: str | None = None
    sender_domain: dict[Hostname, str] | None = None
    auth_user: dict[str, str] | None = None


@attrs.frozen
class WarmupConfig:
    """When a source's ladder holds (over a threshold) or steps back (twice over), judged daily."""

    bounce_rate: Share = 0.05
    deferral_rate: Share = 0.20
    complaint_rate: Share = 0.001
    min_sample: Annotated[int, conv_int(1, 10**9)] = 20


@attrs.frozen
class AuthConfig:
    """Sender authentication of inbound mail: SPF, DKIM, DMARC, ARC -> Authentication-Results."""

    verify: bool = False  # on by itself when an ACL or dmarc_reject needs verdicts
    authserv_id: Hostname | None = None  # default: hostname
    dmarc_reject: bool = False  # honour p=reject with 550 5.7.1
    dmarc_quarantine: Address | None = None  # p=quarantine: deliver here (default: a header)
    arc_seal: bool = True  # seal mail to [domains] forward with the [dkim] key


@attrs.frozen
class DkimConfig:
    """``[dkim."example.com"]`` signs for that From domain and its subdomains (and for ``users``);
    ``[dkim.default]`` (with ``domain``, the d= it signs as) for senders without a key of their own."""

    selector: tuple[str, ...] = ()  # several: one signature each
    key: tuple[Path, ...] = ()  # PEM, one per selector
    algorithm: tuple[Literal["rsa-sha256", "ed25519-sha256"], ...] = ()  # default: the key's
    headers: tuple[Annotated[str, conv_header_name], ...] = DKIM_HEADERS  # signed when present
    oversign: tuple[Annotated[str, conv_header_name], ...] = ("From",)  # listed once more in h=
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"] = (
        "relaxed/relaxed"
    )
    domain: Hostname | None = None  # d=; default the table's name
    users: tuple[str, ...] = ()  # authenticated users it signs for (no key of their own)


@attrs.frozen
class LogConfig:
    accounting: bool = True
    debug: bool = False  # per-connection and per-rule detail lines (connection reuse, ACL decisions)


@attrs.frozen
class StatsConfig:
    retention: Annotated[float, conv_duration(3600)] = 30 * 86400.0  # per-minute time series for the dashboard


@attrs.frozen
class AclRule:
    """One rule: every matcher given must match; then ``action`` (with ``reply``) applies."""

    action: Literal["accept", "reject", "tempfail", "continue"] = "continue"
    reply: Reply | None = None
    client: tuple[Network, ...] | None = None
    rdns: tuple[Pattern, ...] | None = None
    helo: tuple[Pattern, ...] | None = None
    auth: Annotated[bool | tuple[str, ...], conv_bool_or_names] | None = None
    tls: bool | None = None
    sender: tuple[Pattern, ...] | None = None
    recipient: tuple[Pattern, ...] | None = None
    size: Annotated[int, conv_int(0)] | None = None
    spf: tuple[Verdict, ...] | None = None  # data stage only
    dkim: tuple[Verdict, ...] | None = None
    dmarc: tuple[Verdict, ...] | None = None
    arc: tuple[Verdict, ...] | None = None
    comment: str = ""


@attrs.frozen
class HTTPConfig:
    """The HTTP service: admin and injection API plus /metrics on ``listen``, one-click
    unsubscribe on ``public_listen`` (reached by receivers as ``public_url``)."""

    listen: tuple[Endpoint, ...] = ()
    tokens_file: Path | None = None  # NAME:SCOPES:SHA256 lines (pymta-token)
    public_listen: tuple[Endpoint, ...] = ()
    public_url: Annotated[str, conv_https_url] | None = None
    metrics_auth: bool = False  # /metrics needs a "read" token
    max_body: Annotated[int, conv_int(1024, 1 << 30)] = 50 * 1024 * 1024
    template_timeout: Annotated[float, conv_duration(0.01)] = 2.0  # per recipient
    metric_campaigns: tuple[str, ...] | None = None  # campaigns with their own label
    metric_tenants: tuple[str, ...] | None = None


@attrs.frozen
class WebhookConfig:
    """One ``[[webhooks]]`` endpoint: events POSTed as signed JSON, at least once, in order."""

    name: str = ""  # needed
    url: Annotated[str, conv_webhook_url] = ""  # needed
    secret: str | None = None
    secret_file: Path | None = None
    events: tuple[str, ...] | None = None  # None = every type
    batch_size: Annotated[int, conv_int(1, 1000)] = 100
    linger: Annotated[float, conv_duration(0.0, 60.0)] = 1.0  # wait this long for a not-full batch to fill
    timeout: Annotated[float, conv_duration(0.1)] = 10.0
    max_age: Annotated[float, conv_duration(1)] = 3 * 86400.0
    retry_initial: Annotated[float, conv_duration(0.01)] = 5.0
    retry_max: Annotated[float, conv_duration(0.01)] = 600.0


@attrs.frozen
class TrackingConfig:
    """Open and click tracking of injected HTML mail (off unless ``enabled``)."""

    enabled: bool = False
    opens: bool = True
    clicks: bool = True
    campaigns: tuple[str, ...] | None = None  # None = every campaign
    secret: str | None = None  # default: feedback.secret


@attrs.frozen
class Config:
    path: str = attrs.field(default="<config>", metadata={"toml": False})  # the file it came from
    hostname: Hostname = "localhost"
    state_dir: Path = attrs.Factory(lambda: conv_path("var"))
    smtp: SMTPConfig = attrs.Factory(SMTPConfig)
    domains: DomainsConfig = attrs.Factory(DomainsConfig)
    queue: QueueConfig = attrs.Factory(QueueConfig)
    mailbox: MailboxConfig = attrs.Factory(MailboxConfig)
    scan: ScanConfig = attrs.Factory(ScanConfig)
    sendmail: SendmailConfig = attrs.Factory(SendmailConfig)
    outbound: OutboundConfig = attrs.Factory(OutboundConfig)
    dns: DNSConfig = attrs.Factory(DNSConfig)
    log: LogConfig = attrs.Factory(LogConfig)
    stats: StatsConfig = attrs.Factory(StatsConfig)
    limits: LimitsConfig = attrs.Factory(LimitsConfig)
    greylist: GreylistConfig = attrs.Factory(GreylistConfig)
    feedback: FeedbackConfig = attrs.Factory(FeedbackConfig)
    tls: TLSConfig = attrs.Factory(TLSConfig)
    tlsrpt: TLSRPTConfig = attrs.Factory(TLSRPTConfig)
    submission: SubmissionConfig = attrs.Factory(SubmissionConfig)
    dnsbl: DNSBLConfig = attrs.Factory(DNSBLConfig)
    shaping: ShapingConfig = attrs.Factory(ShapingConfig)
    sources: dict[str, SourceConfig] = attrs.Factory(dict)
    pools: dict[str, PoolConfig] = attrs.Factory(dict)
    pool_select: PoolSelectConfig = attrs.Factory(PoolSelectConfig)
    warmup: WarmupConfig = attrs.Factory(WarmupConfig)
    http: HTTPConfig = attrs.Factory(HTTPConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    dkim: dict[Annotated[str, conv_dkim_name], DkimConfig] = attrs.Factory(dict)
    aliases: AliasesConfig = attrs.Factory(AliasesConfig)
    srs: SRSConfig = attrs.Factory(SRSConfig)
    # [virtual] "key" = ["address", ...]; an error names the line of its entry
    virtual: dict[Annotated[str, conv_virtual_key], Annotated[tuple[str, ...], conv_virtual_targets]] = attrs.field(
        factory=dict, metadata={"entries_by_line": True}
    )
    tracking: TrackingConfig = attrs.Factory(TrackingConfig)
    webhooks: tuple[WebhookConfig, ...] = ()
    cluster: ClusterConfig = attrs.Factory(ClusterConfig)
    routes: dict[Hostname, Annotated[tuple[str, int], conv_hostport]] = attrs.Factory(dict)  # "domain" = "host:port"
    acl: dict[Annotated[str, conv_acl_stage], tuple[AclRule, ...]] = attrs.Factory(dict)

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


# -- cross-key rules: every rule that ties one key to another, in one place --------------------


def _cross_key_errors(config: Config) -> Iterator[tuple[str, str]]:
    """(KEY, REASON) for each broken rule, in the order they are reported (the first one stops startup)."""
    from pymta.events import EVENT_TYPES

    for name, entry in config.dkim.items():
        prefix = f"dkim.{name}"
        if not entry.selector or not entry.key:
            yield f"{prefix}.{'key' if entry.selector else 'selector'}", "needed"
        if len(entry.key) != len(entry.selector):
            yield f"{prefix}.key", f"one key per selector ({len(entry.selector)})"
        if entry.algorithm and len(entry.algorithm) != len(entry.selector):
            yield f"{prefix}.algorithm", f"one algorithm per selector ({len(entry.selector)})"
        if "from" not in {h.lower() for h in entry.headers}:
            yield f"{prefix}.headers", "From must be signed"
        for what in ("headers", "oversign"):
            ours = [h for h in getattr(entry, what) if h.lower().startswith("x-pymta-")]
            if ours:  # pymta removes or adds these after signing: a signature over them would break
                yield f"{prefix}.{what}", f"{ours[0]} is pymta's own header, never signed"
        if name == "default" and entry.domain is None:
            yield f"{prefix}.domain", "needed (the d= domain that signs for other senders)"
    names: set[str] = set()
    for i, hook in enumerate(config.webhooks):
        prefix = f"webhooks[{i + 1}]"
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", hook.name):
            yield f"{prefix}.name", "needed, letters, digits, '.', '_' or '-' (at most 64)"
        if hook.name in names:
            yield f"{prefix}.name", f"{hook.name!r} is used twice"
        names.add(hook.name)
        if not hook.url:
            yield f"{prefix}.url", "needed"
        if bool(hook.secret) == bool(hook.secret_file):
            yield f"{prefix}.secret", "give secret or secret_file (one of them)"
        if hook.secret is not None and len(hook.secret.encode()) < 16:
            yield f"{prefix}.secret", "at least 16 characters"
        unknown = sorted(set(hook.events or ()) - set(EVENT_TYPES))
        if unknown:
            yield f"{prefix}.events", f"unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})"
        if hook.retry_max < hook.retry_initial:
            yield f"{prefix}.retry_max", "must not be shorter than retry_initial"
    for stage, rules in config.acl.items():
        for i, rule in enumerate(rules):
            prefix = f"acl.{stage}[{i + 1}]"
            if rule.reply is not None:
                wanted = {"reject": "5", "tempfail": "4"}.get(rule.action)
                if wanted is None:
                    yield f"{prefix}.reply", "only reject and tempfail rules carry a reply"
                elif str(rule.reply[0])[0] != wanted:
                    yield f"{prefix}.reply", f"a {rule.action} reply must be {wanted}xx"
            if rule.recipient is not None and stage in ("connect", "helo", "mail"):
                yield f"{prefix}.recipient", f"recipients are not known at the {stage} stage"
            if rule.size is not None and stage not in ("mail", "data"):
                yield f"{prefix}.size", "the size is known at the mail (SIZE=) and data stages only"
            for method in ("spf", "dkim", "dmarc", "arc"):
                if getattr(rule, method) is not None and stage != "data":
                    yield f"{prefix}.{method}", "sender verdicts are known at the data stage only"
    for i, milter in enumerate(config.scan.milter):
        if not milter.socket:
            yield f"scan.milter[{i + 1}].socket", 'needed ("inet:HOST:PORT" or "unix:/PATH")'
    for name, limits in config.shaping.provider.items():
        if not limits.mx_suffix:
            yield f"shaping.provider.{name}.mx_suffix", "a provider needs MX suffixes"
    for i, backoff in enumerate(config.shaping.backoff):
        if not backoff.match:
            yield f"shaping.backoff[{i + 1}].match", "a regular expression is needed"
    q = config.queue
    if q.retry_max < q.retry_initial:
        yield "queue.retry_max", "must not be shorter than queue.retry_initial"
    if q.max_age < q.retry_initial:
        yield "queue.max_age", "must not be shorter than queue.retry_initial"
    out = config.outbound
    if out.max_connections_per_domain > out.max_connections:
        yield "outbound.max_connections_per_domain", "must not exceed outbound.max_connections"
    if out.connect_timeout is not None and "connect" in (out.timeouts or {}):
        yield "outbound.timeouts", "connect: also set as outbound.connect_timeout; keep one"
    domains = config.domains
    overlap = set(domains.local) & set(domains.forward)
    if overlap:
        yield "domains.forward", f"{sorted(overlap)[0]} is also in domains.local"
    for address in domains.mailboxes or ():
        if address.rpartition("@")[2] not in domains.local:
            yield "domains.mailboxes", f"{address} is not in a domains.local domain"
    fb = config.feedback
    if fb.bounce_domain and (not fb.secret or len(fb.secret.encode()) < 16):
        yield "feedback.secret", "needed with feedback.bounce_domain, at least 16 characters"
    if bool(config.tls.cert) != bool(config.tls.key):
        yield f"tls.{'key' if config.tls.cert else 'cert'}", "tls.cert and tls.key go together"
    if (config.smtp.listen_tls or config.submission.listen) and not config.tls.cert:
        yield "tls.cert", "needed by smtp.listen_tls and submission.listen"
    if config.submission.listen and not config.submission.users_file:
        yield "submission.users_file", "needed with submission.listen"
    for name, src in config.sources.items():
        try:
            ipaddress.ip_address(src.address)
        except ValueError:
            yield f"sources.{name}.address", f"not an IP address {src.address!r}"
        for provider in src.warmup_provider or {}:
            if provider not in config.shaping.provider:
                yield f"sources.{name}.warmup_provider.{provider}", f"no [shaping.provider.{provider}]"
        if (src.warmup or src.warmup_provider) and src.warmup_start is None:
            yield f"sources.{name}.warmup_start", "needed with a warm-up ladder"
    for name, pool in config.pools.items():
        for member in pool.sources or {}:
            if member not in config.sources:
                yield f"pools.{name}.sources", f"no source named {member!r}"
        if not pool.sources:
            yield f"pools.{name}.sources", "a pool needs sources"
    sel = config.pool_select
    for key, target in [("default", sel.default), *[(f"sender_domain.{k}", v) for k, v in (sel.sender_domain or {}).items()],
                        *[(f"auth_user.{k}", v) for k, v in (sel.auth_user or {}).items()]]:  # fmt: skip
        if target is not None and target not in config.pools:
            yield f"pool_select.{key}", f"no pool named {target!r}"
    if not config.smtp.listen:
        yield "smtp.listen", "at least one listener is needed"
    http = config.http
    if http.public_listen and not (fb.bounce_domain and fb.unsubscribe):
        yield "http.public_listen", "one-click unsubscribe needs feedback.bounce_domain and feedback.unsubscribe = true"
    if config.srs.secret is not None and len(config.srs.secret.encode()) < 16:
        yield "srs.secret", "at least 16 characters"
    if http.public_listen and not http.public_url:
        yield "http.public_url", "needed with http.public_listen"
    tr = config.tracking
    if tr.enabled and not (http.public_listen and http.public_url):
        yield "tracking.enabled", "needs http.public_listen and http.public_url"
    if tr.enabled and len((tr.secret or fb.secret or "").encode()) < 16:
        yield "tracking.secret", "needed (or feedback.secret), at least 16 characters"


def _with_derived_defaults(config: Config) -> Config:
    """Defaults taken from another key: a ``[dkim."domain"]`` signs as d=domain unless it says otherwise."""
    dkim = {name: entry if entry.domain or name == "default" else attrs.evolve(entry, domain=name)
            for name, entry in config.dkim.items()}  # fmt: skip
    return attrs.evolve(config, dkim=dkim)


# -- loading --------------------------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` with one line ``FILE: KEY: REASON``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read configuration: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    return build_config(data, path)


def build_config(data: dict[str, Any], path: str = "<config>") -> Config:
    """The :class:`Config` of a parsed TOML document (``path`` names it in errors)."""
    try:
        config: Config = _schema.structure(data, Config)
    except (ConfigValueError, BaseValidationError) as e:
        raise _config_error(e, path) from None
    config = attrs.evolve(_with_derived_defaults(config), path=path)
    for key, reason in _cross_key_errors(config):
        raise ConfigError(f"{path}: {key}: {reason}")
    return config


def _config_error(error: BaseException, where: str) -> ConfigError:
    """One line ``FILE: KEY: REASON`` for the first error cattrs collected (in the file's key order)."""
    key, prefix, by_line = "", "", None
    exc, group = error, None
    while True:
        for note in reversed(getattr(exc, "__notes__", ())):
            if isinstance(note, AttributeValidationNote):
                key = f"{key}.{note.name}" if key else note.name
                field: Any = attrs.fields_dict(group.cl)[note.name] if isinstance(group, ClassValidationError) else None
                by_line = "" if field is not None and field.metadata.get("entries_by_line") else None
            elif isinstance(note, IterableValidationNote):
                if by_line == "":
                    key, by_line = f"{key}.{note.index}", str(note.index)
                elif _is_tables(note.type):
                    key += f"[{note.index + 1}]" if isinstance(note.index, int) else f".{note.index}"
                else:
                    prefix += f"item {note.index + 1}: " if isinstance(note.index, int) else f"{note.index}: "
        if not isinstance(exc, BaseValidationError):
            break
        group, exc = exc, exc.exceptions[0]
    if not isinstance(exc, ConfigValueError):
        raise error
    if isinstance(exc, _UnknownKey):
        key = f"{key}.{exc.key}" if key else exc.key
    reason = exc.form.format(key=key) if isinstance(exc, _NotTables) else str(exc)
    line = f":{_line_of(where, by_line)}" if by_line else ""
    return ConfigError(f"{where}{line}: {key}: {prefix}{reason}")


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


# -- the cattrs converter: how TOML values become the types above -----------------------------


def _is_tables(t: Any) -> bool:
    """Is a value of type ``t`` written as TOML tables: a section class, or a list or table of them?"""
    if get_origin(t) is Annotated:
        return False
    if attrs.has(t):
        return True
    args = get_args(t)
    return (get_origin(t) is tuple and _is_tables(args[0])) or (get_origin(t) is dict and _is_tables(args[1]))


def _noted(index: int | str, t: Any, convert: Callable[..., Any]) -> Any:
    """``convert()``; its error notes where in the list or table it happened (cattrs' own form)."""
    try:
        return convert()
    except Exception as e:
        e.add_note(IterableValidationNote(f"Structuring @ {index!r}", index, t))
        raise


def _section_hook(cls: type) -> Callable[[Any, Any], Any]:
    fields = attrs.fields(cls)
    known = [f.name for f in fields if f.metadata.get("toml", True)]
    omitted = cast(dict[str, Any], {f.name: override(omit=True) for f in fields if f.name not in known})  # cattrs: per-field kwargs
    inner: Callable[..., Any] = make_dict_structure_fn(cls, _schema, **omitted)

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise ConfigValueError(f"expected a table, got {type_name(value)}")
        for key in value:
            if key not in known:
                raise _UnknownKey(key, known)
        try:
            return inner(value, cls)
        except ClassValidationError as e:  # report the key that comes first in the file
            order = {key: i for i, key in enumerate(value)}
            notes = [next((n for n in getattr(x, "__notes__", ()) if isinstance(n, AttributeValidationNote)), None)
                     for x in e.exceptions]  # fmt: skip
            ranked = sorted(zip(e.exceptions, notes, strict=True), key=lambda p: order.get(p[1].name if p[1] else "", 0))
            raise e.derive([x for x, _ in ranked]) from None

    return structure


def _list_hook(t: Any) -> Callable[[Any, Any], tuple[Any, ...]]:
    item = get_args(t)[0]
    convert = _schema.get_structure_hook(item)
    tables = _is_tables(item)

    def structure(value: Any, _: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            if tables:
                raise _NotTables("expected an array of tables [[{key}]]")
            value = [value]
        return tuple(_noted(i, item, lambda v=v: convert(v, item)) for i, v in enumerate(value))

    return structure


def _table_hook(t: Any) -> Callable[[Any, Any], dict[Any, Any]]:
    key_type, value_type = get_args(t)
    convert_key, convert_value = _schema.get_structure_hook(key_type), _schema.get_structure_hook(value_type)
    tables = _is_tables(value_type)

    def structure(value: Any, _: Any) -> dict[Any, Any]:
        if not isinstance(value, dict):
            if tables:
                raise _NotTables("expected arrays of tables [[{key}.NAME]]" if get_origin(value_type) is tuple
                                 else "expected tables [{key}.NAME]")  # fmt: skip
            raise ConfigValueError(f"expected a table, got {type_name(value)}")
        return dict(_noted(k, value_type, lambda k=k, v=v: (convert_key(k, key_type), convert_value(v, value_type)))
                    for k, v in value.items())  # fmt: skip

    return structure


def _choice_hook(t: Any) -> Callable[[Any, Any], str]:
    choices = get_args(t)

    def structure(value: Any, _: Any) -> str:
        text = conv_str(value)
        if text not in choices:
            raise ConfigValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return structure


def _converter_hook(t: Any) -> Callable[[Any, Any], Any]:
    convert = t.__metadata__[-1]
    return lambda value, _: convert(value)


_schema = cattrs.Converter(detailed_validation=True)
_schema.register_structure_hook(str, lambda v, _: conv_str(v))
_schema.register_structure_hook(bool, lambda v, _: conv_bool(v))
_schema.register_structure_hook(int, lambda v, _: conv_int()(v))
_schema.register_structure_hook_factory(lambda t: cast(Any, get_origin(t)) is Literal, _choice_hook)
_schema.register_structure_hook_factory(lambda t: cast(Any, get_origin(t)) is tuple and get_args(t)[1:] == (...,), _list_hook)
_schema.register_structure_hook_factory(lambda t: cast(Any, get_origin(t)) is dict, _table_hook)
_schema.register_structure_hook_factory(attrs.has, _section_hook)
_schema.register_structure_hook_factory(lambda t: cast(Any, get_origin(t)) is Annotated and callable(t.__metadata__[-1]),
                                        _converter_hook)  # fmt: skip
