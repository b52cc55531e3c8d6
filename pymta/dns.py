"""DNS for delivery: MX (RFC 5321 §5.1, RFC 7505 null MX), A/AAAA, TXT, TLSA, on dnspython in worker
threads (never blocking the reactor), with a TTL-respecting cache on the injected clock.

With ``dnssec`` the queries ask for DNSSEC (DO and AD bits) and each answer remembers whether the
resolver set the AD bit: a validating resolver the operator trusts (on loopback, as Postfix's
``smtp_dns_support_level = dnssec`` expects) vouches for it. A bogus answer reaches us as SERVFAIL.

Errors are two kinds: :class:`DNSPermanentError` (NXDOMAIN: bounce, 5.1.2) and
:class:`DNSTemporaryError` (SERVFAIL, timeout, refusal, malformed answers: defer, 4.4.3).
"""

from __future__ import annotations

import functools
import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from pymta.hostname import ascii_hostname
from pymta.interfaces import IResolver

log = Logger(namespace="pymta.dns")

NEGATIVE_TTL = 300.0  # cap for cached NXDOMAIN / no-data answers
ERROR_TTL = 5.0  # temporary failures are remembered briefly (no hammering a dead server)
MAX_TTL = 86400.0


class DNSError(Exception):
    """A lookup failed; ``permanent`` says whether retrying can help."""

    permanent = False


class DNSPermanentError(DNSError):
    permanent = True


class DNSTemporaryError(DNSError):
    permanent = False


@dataclass(frozen=True)
class MXResult:
    """The mail exchangers of a domain, in the order to try them."""

    domain: str
    hosts: tuple[str, ...] = ()
    null: bool = False  # RFC 7505: the domain accepts no mail
    implicit: bool = False  # no MX records: the domain itself (RFC 5321 §5.1)
    preferences: tuple[int, ...] = field(default=(), compare=False)
    literals: tuple[str, ...] = field(default=(), compare=False)  # IP literals given as MX names, left out
    secure: bool = field(default=False, compare=False)  # DNSSEC-validated (AD bit) MX answer


@dataclass(frozen=True)
class TLSAResult:
    """The TLSA records of ``_PORT._tcp.HOST`` as (usage, selector, matching type, data), and
    whether the answer (or its denial) was DNSSEC-validated."""

    name: str
    records: tuple[tuple[int, int, int, bytes], ...]
    secure: bool


def to_ascii(name: str) -> str:
    """A domain in its ASCII (A-label) form, lower-case, no trailing dot; DNSPermanentError if invalid."""
    return ascii_hostname(name, underscores=True, error=DNSPermanentError)


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str) -> str | None:
    """The address of ``192.0.2.1``, ``[192.0.2.1]``, ``2001:db8::1``, ``[IPv6:2001:db8::1]``; else None
    (cached: a smarthost or route is parsed once, not for every message)."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_server(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"[::1]:53"``, ``"192.0.2.53"`` -> (address, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port[1:]) if port.startswith(":") else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


@implementer(IResolver)
class Resolver:
    """Asynchronous lookups with a cache; ``servers`` None means the system's resolv.conf."""

    def __init__(
        self,
        reactor: Any,
        threadpool: Any,
        servers: list[str] | tuple[str, ...] | None = None,
        timeout: float = 5.0,
        clock: Any = None,
        rng: random.Random | None = None,
        prefer_ipv6: bool = True,
        dnssec: bool = False,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.clock = clock or reactor
        self.rng = rng or random.Random()
        self.prefer_ipv6 = prefer_ipv6
        self._resolvers: list[dns.resolver.Resolver] = []
        if servers:
            for text in servers:
                address, port = parse_server(text)
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = [address]
                r.port = port
                self._resolvers.append(r)
        else:
            self._resolvers.append(dns.resolver.Resolver())
        self.dnssec = dnssec
        for r in self._resolvers:
            r.timeout = timeout
            r.lifetime = timeout * 2
            r.cache = None
            if dnssec:  # RFC 6840 §5.7: AD in the query asks a validating resolver to tell
                r.use_edns(0, dns.flags.DO, 1232)
                r.flags = dns.flags.RD | dns.flags.AD
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    # -- the raw query ---------------------------------------------------------------------


    def clear_cache(self) -> None:
        """Forget every cached answer (positive and negative): the next lookups ask the servers."""
        self._cache.clear()
    def _query_blocking(self, name: str, rdtype: str) -> tuple[list[Any], float, str | None, bool]:
        """(records, ttl, error kind or None, DNSSEC-validated) — runs in a worker thread."""
        records, ttl, error, secure = self._query_resolvers(name, rdtype)
        return records, ttl, error, secure and self.dnssec

    def _query_resolvers(self, name: str, rdtype: str) -> tuple[list[Any], float, str | None, bool]:
        last: tuple[list[Any], float, str | None, bool] = ([], ERROR_TTL, "temporary: no server answered", False)
        for resolver in self._resolvers:
            try:
                answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN as e:
                return [], _negative_ttl(e), "nxdomain", _nxdomain_secure(e)
            except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as e:
                last = ([], ERROR_TTL, f"temporary: {type(e).__name__}: {e}", False)
                continue
            except dns.resolver.YXDOMAIN:
                return [], ERROR_TTL, "nxdomain", False
            except (dns.exception.DNSException, ValueError, UnicodeError) as e:
                last = ([], ERROR_TTL, f"temporary: malformed answer: {e}", False)
                continue
            secure = answer.response is not None and bool(answer.response.flags & dns.flags.AD)
            if answer.rrset is None:
                ttl = NEGATIVE_TTL
                if answer.response is not None:
                    for rrset in answer.response.authority:
                        if rrset.rdtype == dns.rdatatype.SOA:
                            ttl = min(rrset.ttl, rrset[0].minimum, NEGATIVE_TTL)
                return [], ttl, None, secure
            return list(answer.rrset), min(float(answer.rrset.ttl), MAX_TTL), None, secure
        return last

    def _query(self, name: str, rdtype: str) -> defer.Deferred[Any]:
        """Deferred of the records of (name, rdtype); cached until the TTL runs out."""
        return self._query_secure(name, rdtype).addCallback(lambda answer: answer[0])

    def _query_secure(self, name: str, rdtype: str) -> defer.Deferred[Any]:
        """Deferred of (records, DNSSEC-validated) of (name, rdtype), cached until the TTL runs out."""
        key = (name, rdtype)
        now = self.clock.seconds()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            records, error, secure = hit[1]
            return defer.fail(_error(name, rdtype, error)) if error else defer.succeed((records, secure))
        d = threads.deferToThreadPool(self.reactor, self.threadpool, self._query_blocking, name, rdtype)

        def store(result: tuple[list[Any], float, str | None, bool]) -> tuple[list[Any], bool]:
            records, ttl, error, secure = result
            log.debug("{rdtype} lookup of {name}: {result}", event="dns_lookup", name=name, rdtype=rdtype,
                      result=lookup_result(error))  # fmt: skip
            self._cache[key] = (self.clock.seconds() + ttl, (records, error, secure))
            if len(self._cache) > 100_000:
                self._cache.clear()
            if error:
                raise _error(name, rdtype, error)
            return records, secure

        return d.addCallback(store)

    # -- lookups ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def lookup_mx(self, domain: str) -> Any:
        name = to_ascii(domain)
        try:
            records, secure = yield self._query_secure(name, "MX")
        except DNSPermanentError:
            raise DNSPermanentError(f"domain {name} does not exist (NXDOMAIN)") from None
        if not records:
            return MXResult(name, (name,), implicit=True, preferences=(0,), secure=secure)
        mx = sorted((int(r.preference), str(r.exchange).rstrip(".").lower()) for r in records)
        if len(mx) == 1 and mx[0][1] in ("", "."):
            return MXResult(name, (), null=True)
        mx = [(p, h) for p, h in mx if h not in ("", ".")]
        # RFC 5321 §5.1: an MX names a host, never an address; a literal is not used (Postfix alike).
        literals = tuple(h for _, h in mx if ip_literal(h) is not None)
        mx = [(p, h) for p, h in mx if h not in literals]
        # Equal preferences in random order (RFC 5321 §5.1), lower preferences first.
        groups: dict[int, list[str]] = {}
        for pref, host in mx:
            groups.setdefault(pref, []).append(host)
        hosts: list[str] = []
        prefs: list[int] = []
        for pref in sorted(groups):
            group = groups[pref]
            self.rng.shuffle(group)
            hosts.extend(group)
            prefs.extend([pref] * len(group))
        return MXResult(name, tuple(hosts), preferences=tuple(prefs), literals=literals, secure=secure)

    @defer.inlineCallbacks
    def lookup_addresses(self, host: str) -> Any:
        """IPv6 and IPv4 addresses, interleaved (the preferred family first) for fallback."""
        name = to_ascii(host)
        results = yield defer.DeferredList([self._query(name, "AAAA"), self._query(name, "A")], consumeErrors=True)
        v6 = [str(r.address) for r in results[0][1]] if results[0][0] else []
        v4 = [str(r.address) for r in results[1][1]] if results[1][0] else []
        if not v6 and not v4:
            failures = [f for ok, f in results if not ok]
            if failures and all(f.check(DNSPermanentError) for f in failures) and len(failures) == 2:
                raise DNSPermanentError(f"host {name} does not exist (NXDOMAIN)")
            temporary = [f for f in failures if f.check(DNSTemporaryError)]
            if temporary:
                raise DNSTemporaryError(temporary[0].getErrorMessage())
            return []
        first, second = (v6, v4) if self.prefer_ipv6 else (v4, v6)
        out: list[str] = []
        for i in range(max(len(first), len(second))):
            out.extend(x[i] for x in (first, second) if i < len(x))
        return out

    @defer.inlineCallbacks
    def addresses_secure(self, host: str) -> Any:
        """Whether the address records of ``host`` (those that exist) are DNSSEC-validated
        (RFC 7672 §2.2.2: TLSA records of a host with insecure addresses are not used)."""
        name = to_ascii(host)
        results = yield defer.DeferredList([self._query_secure(name, "AAAA"), self._query_secure(name, "A")],
                                           consumeErrors=True)  # fmt: skip
        answers = [value for ok, value in results if ok]
        return bool(answers) and all(secure for _, secure in answers) and any(records for records, _ in answers)

    @defer.inlineCallbacks
    def lookup_tlsa(self, host: str, port: int = 25) -> Any:
        """The :class:`TLSAResult` of ``_PORT._tcp.HOST``; NXDOMAIN is an empty result, a failed
        lookup (SERVFAIL, which is how a validating resolver reports a bogus answer) raises
        :class:`DNSTemporaryError`."""
        name = f"_{int(port)}._tcp.{to_ascii(host)}"
        try:
            records, secure = yield self._query_secure(name, "TLSA")
        except DNSPermanentError:
            hit = self._cache.get((name, "TLSA"))
            return TLSAResult(name, (), bool(hit and hit[1][2]))
        out = []
        for r in records:
            if getattr(r, "rdtype", None) != dns.rdatatype.TLSA:
                continue
            out.append((int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)))
        return TLSAResult(name, tuple(out), secure)

    @defer.inlineCallbacks
    def lookup_ptr(self, address: str) -> Any:
        """Host names of an IP address (PTR), lower-case without the trailing dot."""
        import ipaddress

        try:
            name = ipaddress.ip_address(address.split("%", 1)[0]).reverse_pointer
        except ValueError:
            raise DNSPermanentError(f"not an IP address: {address!r}") from None
        records = yield self._query(name, "PTR")
        return [str(r.target).rstrip(".").lower() for r in records]

    @defer.inlineCallbacks
    def lookup_txt(self, name: str) -> Any:
        records = yield self._query(to_ascii(name), "TXT")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in records]


def _nxdomain_secure(error: dns.resolver.NXDOMAIN) -> bool:
    """Whether an NXDOMAIN answer carried the AD bit (an authenticated denial)."""
    try:
        return any(bool(response.flags & dns.flags.AD) for response in error.responses().values())  # type: ignore[no-untyped-call]  # dnspython: unannotated
    except (AttributeError, KeyError):
        return False


def _negative_ttl(error: dns.resolver.NXDOMAIN) -> float:
    try:
        for response in error.responses().values():  # type: ignore[no-untyped-call]  # dnspython: unannotated
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    return float(min(rrset.ttl, rrset[0].minimum, NEGATIVE_TTL))
    except (AttributeError, IndexError, KeyError):
        pass
    return NEGATIVE_TTL


def lookup_result(error: str | None) -> str:
    """A lookup's outcome in one word: ok, nxdomain, timeout, servfail (no server gave an answer)
    or error (a malformed answer)."""
    if not error:
        return "ok"
    if error == "nxdomain":
        return "nxdomain"
    if "Timeout" in error:
        return "timeout"
    return "error" if "malformed" in error else "servfail"


def _error(name: str, rdtype: str, error: str) -> DNSError:
    if error == "nxdomain":
        return DNSPermanentError(f"{name} does not exist (NXDOMAIN)")
    return DNSTemporaryError(f"{rdtype} lookup of {name} failed: {error.split(': ', 1)[-1]}")
