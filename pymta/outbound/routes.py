"""Where mail for a domain goes: a smarthost, a per-domain route, an address literal, or the
domain's MX hosts (RFC 5321 §5.1) with their addresses — and the permanent/temporary verdicts
(null MX, NXDOMAIN, DNS failure, a loop back to ourselves)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pymta.dns import DNSPermanentError, DNSTemporaryError
from pymta.dns import ip_literal as _literal
from pymta.smtp.replies import Reply


@dataclass(frozen=True)
class Hop:
    """One next-hop host and the addresses to try for it, in order."""

    name: str
    port: int
    addresses: tuple[str, ...]


class RouteError(Exception):
    """No usable next hop; ``reply`` says why (5xx: bounce, 4xx: defer)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


log = Logger(namespace="pymta.outbound.routes")

NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX, RFC 7505)")


class Router:
    """Next hops for a recipient domain."""

    def __init__(
        self,
        resolver: Any,
        smtp_port: int = 25,
        smarthost: tuple[str, int] | None = None,
        routes: dict[str, tuple[str, int]] | None = None,
        own_listeners: Iterable[tuple[str, int]] = (),
        local_addresses: Iterable[str] = (),
    ) -> None:
        self.resolver = resolver
        self.smtp_port = smtp_port
        self.smarthost = smarthost
        self.routes = {k.lower(): v for k, v in (routes or {}).items()}
        self.own = {(str(ipaddress.ip_address(ip)) if _literal(ip) else ip, port) for ip, port in own_listeners}
        self.local_addresses = {str(ipaddress.ip_address(a)) for a in local_addresses}

    def is_self(self, address: str, port: int) -> bool:
        """An MX that is one of our own listeners (RFC 5321 §5.1: a loop, not a delivery)."""
        if (address, port) in self.own:
            return True
        wildcard = any(ip in ("0.0.0.0", "::") and p == port for ip, p in self.own)
        return wildcard and address in self.local_addresses

    def uses_mx(self, domain: str) -> bool:
        """Whether mail for ``domain`` goes to its MX hosts (not a smarthost, a route or a literal)."""
        domain = domain.lower().rstrip(".")
        return _literal(domain) is None and (self.routes.get(domain) or self.smarthost) is None

    @defer.inlineCallbacks
    def next_hops(self, domain: str) -> Any:
        """A list of :class:`Hop` to try in order; raises :class:`RouteError`."""
        domain = domain.lower().rstrip(".")
        literal = _literal(domain)
        if literal is not None:
            return self._check_loop([Hop(domain, self.smtp_port, (literal,))])
        target = self.routes.get(domain) or self.smarthost
        if target is not None:
            host, port = target
            ip = _literal(host)
            if ip is not None:
                return self._check_loop([Hop(host, port, (ip,))])
            name = host[1:-1] if host.startswith("[") else host  # [name]: no MX lookup (Postfix style)
            addresses = yield self._addresses(name)
            return self._check_loop([Hop(name, port, tuple(addresses))])
        try:
            mx = yield self.resolver.lookup_mx(domain)
        except DNSPermanentError as e:
            raise RouteError(Reply(550, "5.1.2", f"Host or domain name not found: {e}")) from None
        except DNSTemporaryError as e:
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup failed, will retry: {e}")) from None
        if mx.null:
            raise RouteError(NULL_MX)
        for literal in mx.literals:
            log.warn("MX of {domain} names the IP literal {mx}: ignored (RFC 5321 §5.1 wants a host name)",
                     domain=domain, mx=literal, event="mx_ip_literal")  # fmt: skip
        hops: list[Hop] = []
        temporary: Exception | None = None
        for host in mx.hosts:
            try:
                addresses = yield self.resolver.lookup_addresses(host)
            except DNSTemporaryError as e:
                temporary = e
                continue
            except DNSPermanentError:
                continue
            if addresses:
                hops.append(Hop(host, self.smtp_port, tuple(addresses)))
        if not hops:
            if temporary is not None:
                raise RouteError(Reply(451, "4.4.3", f"DNS lookup of the mail exchangers failed: {temporary}"))
            if mx.implicit:
                raise RouteError(Reply(550, "5.1.2", f"Domain {domain} has no MX and no address records"))
            if mx.literals and not mx.hosts:
                raise RouteError(Reply(451, "4.4.4", f"The MX records of {domain} name only IP literals "
                                                     f"({', '.join(mx.literals)}), which RFC 5321 §5.1 excludes"))  # fmt: skip
            raise RouteError(Reply(451, "4.4.4", f"No address for any mail exchanger of {domain}"))
        return self._check_loop(hops)

    @defer.inlineCallbacks
    def _addresses(self, name: str) -> Any:
        try:
            addresses = yield self.resolver.lookup_addresses(name)
        except DNSPermanentError as e:
            raise RouteError(Reply(451, "4.4.4", f"Next hop {name} not found: {e}")) from None
        except DNSTemporaryError as e:
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup of next hop {name} failed: {e}")) from None
        if not addresses:
            raise RouteError(Reply(451, "4.4.4", f"Next hop {name} has no address"))
        return addresses

    def _check_loop(self, hops: list[Hop]) -> list[Hop]:
        kept = []
        for hop in hops:
            addresses = tuple(a for a in hop.addresses if not self.is_self(a, hop.port))
            if addresses:
                kept.append(Hop(hop.name, hop.port, addresses))
        if not kept:
            raise RouteError(Reply(554, "5.4.6", "Mail for this domain loops back to myself"))
        return kept
