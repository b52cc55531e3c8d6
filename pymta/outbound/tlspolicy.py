"""Outbound TLS policy from the recipient domain: MTA-STS (RFC 8461).

:class:`MTASTS` answers "which MTA-STS policy applies to mail for this domain now": the
``_mta-sts`` TXT record through pymta's resolver; the policy fetched over HTTPS from
``mta-sts.DOMAIN/.well-known/mta-sts.txt`` with Twisted's HTTP client, the certificate verified
for that name against the system trust store (or ``[outbound] tls_ca_file``), no redirects, with
size and time limits; the policy cached on disk under ``state_dir`` until ``max_age`` (it
survives restarts) and fetched again when the TXT record's id changes. A fetch that fails falls
back to an unexpired cached policy, else to no policy (RFC 8461 §5.1).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer, endpoints, ssl
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from pymta.dns import DNSError, DNSPermanentError, to_ascii
from pymta.httpbody import LimitedBody
from pymta.tls import certificate_problem, trust_root

log = Logger(namespace="pymta.outbound.tlspolicy")

MAX_POLICY_SIZE = 65536  # RFC 8461 §3.3 lets senders limit the body; 64 KiB is generous
FETCH_TIMEOUT = 60.0  # connect, TLS, request and body together
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: at most one year
FAILED_FETCH_MEMORY = 300.0  # a failed fetch is not repeated for this long (per domain and id)
MAX_MEMORY_ENTRIES = 100_000
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MX_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9])?$")


class PolicyError(Exception):
    """A policy, or the TXT record announcing it, cannot be used; the text says why."""


@dataclass(frozen=True)
class STSPolicy:
    """A parsed MTA-STS policy: ``mode`` is enforce, testing or none."""

    mode: str
    mx: tuple[str, ...]
    max_age: int

    def matches(self, host: str) -> bool:
        """RFC 8461 §4.1: exact, or ``*.example.com`` for exactly one more leftmost label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


@dataclass(frozen=True)
class CachedPolicy:
    """A policy as cached: the TXT id it was fetched under and when (wall clock, seconds)."""

    domain: str
    id: str
    policy: STSPolicy
    fetched: float

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None when they announce no policy
    (RFC 8461 §3.1: exactly one record beginning ``v=STSv1;`` with a valid id)."""
    sts = [r for r in records if r.replace(" ", "").startswith("v=STSv1;") or r.strip() == "v=STSv1"]
    if len(sts) != 1:
        if len(sts) > 1:
            raise PolicyError(f"{len(sts)} v=STSv1 TXT records (exactly one is allowed)")
        return None
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    if not _ID.match(policy_id):
        raise PolicyError(f"TXT record has no valid id (1 to 32 letters and digits): {sts[0][:80]!r}")
    return policy_id


def parse_policy(body: bytes) -> STSPolicy:
    """RFC 8461 §3.2 ``key: value`` lines (CRLF or LF); unknown keys are ignored."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8 text") from None
    values: dict[str, list[str]] = {}
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip() or key != key.strip():
            raise PolicyError(f"line {number} is not 'key: value': {line[:60]!r}")
        values.setdefault(key.strip(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise PolicyError(f"version must be STSv1, got {values.get('version')}")
    modes = values.get("mode", [])
    if len(modes) != 1 or modes[0] not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode must be one of enforce, testing, none, got {modes}")
    ages = values.get("max_age", [])
    if len(ages) != 1 or not ages[0].isdigit() or len(ages[0]) > 10:
        raise PolicyError(f"max_age must be a number of seconds, got {ages}")
    mx = tuple(m.lower().rstrip(".") for m in values.get("mx", []))
    for pattern in mx:
        if not _MX_PATTERN.match(pattern) or "*" in pattern[1:]:
            raise PolicyError(f"not an mx pattern: {pattern[:80]!r}")
    if modes[0] != "none" and not mx:
        raise PolicyError(f"mode {modes[0]} needs at least one mx line")
    return STSPolicy(modes[0], mx, min(int(ages[0]), MAX_AGE_LIMIT))


@implementer(IAgentEndpointFactory)
class _PolicyHostEndpoints:
    """Connects to ``mta-sts.DOMAIN`` at the address pymta's resolver gives, TLS verified for
    that name (so the fetch needs no system resolver and works with the test DNS server)."""

    def __init__(self, reactor: Any, resolver: Any, port: int, trust_root: Any, timeout: float) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.port = port
        self.trust_root = trust_root
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        return _ResolvingTLSEndpoint(self, uri.host.decode("ascii"))


class _ResolvingTLSEndpoint:
    def __init__(self, parent: _PolicyHostEndpoints, host: str) -> None:
        self.parent = parent
        self.host = host

    @defer.inlineCallbacks
    def connect(self, factory: Any) -> Any:
        p = self.parent
        addresses = yield p.resolver.lookup_addresses(self.host)
        if not addresses:
            raise PolicyError(f"{self.host} has no address")
        kind = endpoints.TCP6ClientEndpoint if ":" in addresses[0] else endpoints.TCP4ClientEndpoint
        tcp: Any = kind(p.reactor, addresses[0], p.port, timeout=p.timeout)
        options = ssl.optionsForClientTLS(self.host, trustRoot=p.trust_root)
        wrapped: Any = endpoints.wrapClientTLS(options, tcp)  # zope methods are written without self
        proto = yield wrapped.connect(factory)
        return proto


class MTASTS:
    """MTA-STS policies per recipient domain; :meth:`policy_for` fires with a :class:`CachedPolicy`
    (mode enforce or testing) or None. ``skip``: domains with a policy of their own in the config."""

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        cache_dir: str,
        ca_file: str | None = None,
        clock: Any = None,
        https_port: int = 443,
        fetch_timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        skip: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.reactor = reactor
        self.clock = clock or reactor
        self.resolver = resolver
        self.cache_dir = cache_dir
        self.fetch_timeout = fetch_timeout
        self.max_size = max_size
        self.skip = frozenset(skip)
        self.ca_file = ca_file
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        endpoints_ = _PolicyHostEndpoints(reactor, resolver, https_port, trust_root(ca_file), fetch_timeout)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints_)
        self._memory: dict[str, CachedPolicy | None] = {}
        self._failed: dict[tuple[str, str], float] = {}  # (domain, id) -> retry the fetch after
        self._fetching: dict[tuple[str, str], defer.Deferred[Any]] = {}

    # -- the question the delivery agent asks ----------------------------------------------

    @defer.inlineCallbacks
    def policy_for(self, domain: str) -> Any:
        try:
            domain = to_ascii(domain)
        except DNSPermanentError:
            return None
        if domain in self.skip:
            return None
        now = self.clock.seconds()
        cached = self._cached(domain, now)
        try:
            records = yield self.resolver.lookup_txt(f"_mta-sts.{domain}")
            policy_id = parse_txt(records)
        except DNSPermanentError:
            policy_id = None
        except (DNSError, PolicyError) as e:
            log.info("MTA-STS TXT record of {domain} unusable: {why}", domain=domain, why=str(e), event="mta_sts_txt")
            policy_id = None
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return self._usable(cached)  # no (new) announcement: an unexpired policy still holds
        key = (domain, policy_id)
        if self._failed.get(key, 0) > now:
            return self._usable(cached)
        fetching = self._fetching.get(key)
        if fetching is None:
            fetching = self._fetching[key] = self._fetch(domain, policy_id)
            fetching.addBoth(lambda r: (self._fetching.pop(key, None), r)[1])
        fresh = yield _shared(fetching)
        if fresh is None:
            return self._usable(cached)
        return self._usable(fresh)

    def tls_problem(self, proto: Any, mx: str) -> str | None:
        """What enforce would have refused in a session made under testing (an RFC 8460 result type)."""
        if proto.tls is None:
            return "starttls-not-supported"
        return certificate_problem(proto.transport, mx, self.ca_file)

    @staticmethod
    def _usable(entry: CachedPolicy | None) -> CachedPolicy | None:
        return entry if entry is not None and entry.policy.mode != "none" else None

    # -- fetching ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _fetch(self, domain: str, policy_id: str) -> Any:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        try:
            d = self.agent.request(b"GET", url.encode("ascii"), Headers({b"User-Agent": [b"pymta"]}))
            d.addTimeout(self.fetch_timeout, self.clock, onTimeoutCancel=self._timed_out)
            response = yield d
            # The body is always read (bounded), so that the connection is finished either way.
            body_d: defer.Deferred[Any] = defer.Deferred()
            response.deliverBody(LimitedBody(body_d, self.max_size, PolicyError, "policy"))
            body_d.addTimeout(self.fetch_timeout, self.clock, onTimeoutCancel=self._timed_out)
            body = yield body_d
            if response.code != 200:  # redirects are not followed (RFC 8461 §3.3)
                raise PolicyError(f"HTTP status {response.code}")
            ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1").lower()
            if ctype.split(";")[0].strip() != "text/plain":
                raise PolicyError(f"media type {ctype or 'missing'}, not text/plain")
            policy = parse_policy(body)
        except Exception as e:
            why = str(e) or type(e).__name__
            if len(self._failed) >= MAX_MEMORY_ENTRIES:
                self._failed.clear()
            self._failed[(domain, policy_id)] = self.clock.seconds() + FAILED_FETCH_MEMORY
            log.warn("MTA-STS policy of {domain} (id {id}) not fetched from {url}: {why}", domain=domain, id=policy_id,
                     url=url, why=why, event="mta_sts_fetch_failed")  # fmt: skip
            return None
        entry = CachedPolicy(domain, policy_id, policy, self.clock.seconds())
        self._store(entry)
        log.info("MTA-STS policy of {domain} (id {id}): mode {mode}, mx {mx}, max_age {max_age}", domain=domain,
                 id=policy_id, mode=policy.mode, mx=list(policy.mx), max_age=policy.max_age, event="mta_sts_policy")  # fmt: skip
        return entry

    @staticmethod
    def _timed_out(result: Any, timeout: float) -> Any:
        if hasattr(result, "cleanFailure"):  # the request's own cancellation failure
            return Failure(PolicyError(f"timed out after {timeout:g}s"))
        return result

    # -- the cache: memory in front of one JSON file per domain ---------------------------

    def _path(self, domain: str) -> str:
        return os.path.join(self.cache_dir, f"{domain}.json")

    def _cached(self, domain: str, now: float) -> CachedPolicy | None:
        if domain in self._memory:
            entry = self._memory[domain]
        else:
            entry = self._load(domain)
            if len(self._memory) >= MAX_MEMORY_ENTRIES:
                self._memory.clear()
            self._memory[domain] = entry
        if entry is not None and entry.expires <= now:
            return None
        return entry

    def _load(self, domain: str) -> CachedPolicy | None:
        path = self._path(domain)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            p = data["policy"]
            policy = STSPolicy(str(p["mode"]), tuple(str(m) for m in p["mx"]), int(p["max_age"]))
            return CachedPolicy(domain, str(data["id"]), policy, float(data["fetched"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("MTA-STS cache file {path} unreadable, ignored: {why}", path=path, why=str(e))
            return None

    def _store(self, entry: CachedPolicy) -> None:
        self._memory[entry.domain] = entry
        path = self._path(entry.domain)
        data = {"domain": entry.domain, "id": entry.id, "fetched": entry.fetched, "policy": asdict(entry.policy)}
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.error("MTA-STS cache file {path} not written: {why}", path=path, why=str(e))


def _shared(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A Deferred of ``d``'s result (``d`` never fails) that leaves ``d`` usable by other waiters."""
    out: defer.Deferred[Any] = defer.Deferred()
    def relay(result: Any) -> Any:
        out.callback(result)
        return result

    d.addCallback(relay)
    return out
