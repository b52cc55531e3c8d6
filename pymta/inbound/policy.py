"""Who may send to whom: relay control and local-mailbox checks at the RCPT stage.

Never an open relay: a recipient is accepted only for a local domain (existing, safe mailbox),
a forward domain, or — from a ``relay_from`` network or an authenticated client — for relay.
Sender-specified routing in any disguise (``%`` hack, ``!`` paths, a quoted local part holding
``@``, source routes, IP literals, case and trailing-dot variants) never turns into a relay.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from pymta.envelope import FAILED, ROUTE_FEEDBACK, ROUTE_FORWARD, ROUTE_LOCAL, ROUTE_RELAY, Recipient
from pymta.feedback.verp import looks_like_return_path
from pymta.inbound.aliases import AliasTables, expand
from pymta.inbound.mailbox import mailbox_path, split_delimiter
from pymta.inbound.quota import known_usage
from pymta.inbound.srs import SRS, SRSError, is_srs
from pymta.interfaces import IRecipientPolicy
from pymta.smtp.replies import Reply

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
ROUTING_DENIED = Reply(550, "5.7.1", "Sender-specified routing is not allowed")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
BAD_MAILBOX_NAME = Reply(550, "5.1.1", "Mailbox name not acceptable here")
# Role names every local domain has (RFC 2142 abuse, RFC 5321 postmaster, Postfix's MAILER-DAEMON):
# without their own mailbox or alias they reach the configured postmaster.
ROLE_NAMES = frozenset({"postmaster", "abuse", "mailer-daemon"})


@dataclass(frozen=True, slots=True)
class Target:
    """One address an accepted recipient is delivered to (after alias expansion)."""

    address: str
    route: str | None  # None: this branch failed (``reply`` says why) and is bounced
    reply: Reply | None = None
    forwarded: bool = False  # an alias sends it to another domain: the sender is rewritten (SRS)


@dataclass(frozen=True, slots=True)
class Decision:
    """Either a route for an accepted recipient, or the reply refusing it."""

    route: str | None
    reply: Reply | None
    address: str  # the normalised address (domain lower-cased, no trailing dot)
    # what the recipient became through aliases and virtual maps (empty: the address itself)
    targets: tuple[Target, ...] = ()
    original: str = ""  # the expanded address (normalised), when ``targets`` is set

    def deliveries(self) -> tuple[Target, ...]:
        """Every target, the address itself when it was not expanded."""
        return self.targets or (Target(self.address, self.route),)


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, domain); the domain lower-cased without a trailing dot.

    The split is at the last ``@`` outside a quoted local part.
    """
    if address.startswith('"'):
        end = _closing_quote(address)
        if end > 0 and address[end + 1 : end + 2] == "@":
            return address[: end + 1], address[end + 2 :].lower().rstrip(".")
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


def _closing_quote(text: str) -> int:
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def unquote_local(local: str) -> str:
    """The content of a quoted local part (backslash escapes removed); other local parts as they are."""
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        out, i, body = [], 0, local[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                i += 1
            out.append(body[i])
            i += 1
        return "".join(out)
    return local


@functools.lru_cache(maxsize=4096)  # one parse per client, not per RCPT and ACL rule (IPs are immutable)
def parse_ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address as an IP (IPv4-mapped IPv6 as IPv4; zone ids dropped), or None."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str | None, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = parse_ip(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)


@implementer(IRecipientPolicy)
class RelayPolicy:
    """RCPT-stage decisions from the ``[domains]`` configuration."""

    def __init__(
        self,
        local_domains: Iterable[str],
        mailboxes: Iterable[str] | None,
        relay_from: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
        forward_domains: Iterable[str],
        mail_root: str,
        feedback_domains: Iterable[str] = (),
        feedback_addresses: Iterable[str] = (),
        postmaster: str | None = None,
        hostname: str = "",
        tables: AliasTables | None = None,
        srs: SRS | None = None,
        delimiter: str = "",
        max_depth: int = 20,
        max_expansion: int = 1000,
        clock: Any = None,
        quotas: Any = None,
    ) -> None:
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.forward_domains = frozenset(d.lower() for d in forward_domains)
        self.mailboxes = None if mailboxes is None else frozenset(a.lower() for a in mailboxes)
        self.relay_from = tuple(relay_from)
        self.mail_root = mail_root
        self.feedback_domains = frozenset(d.lower() for d in feedback_domains)
        self.feedback_addresses = frozenset(a.lower() for a in feedback_addresses)
        self.postmaster = postmaster
        # RFC 5321 §4.5.1 names: bare, and at our own host name (Postfix has it in mydestination)
        self.postmaster_names = frozenset({"postmaster", f"postmaster@{hostname.lower()}"} if hostname else {"postmaster"})
        self.tables = tables or AliasTables(None)
        self.srs = srs
        self.delimiter = delimiter
        self.max_depth = max_depth
        self.max_expansion = max_expansion
        self.clock = clock
        self.quotas = quotas if quotas else None  # pymta.inbound.quota.Quotas

    def may_relay(self, peer_address: str, auth_user: str | None = None) -> bool:
        """True for authenticated clients and clients in a ``relay_from`` network."""
        return bool(auth_user) or in_networks(peer_address, self.relay_from)

    def recipient(self, address: str, peer_address: str, auth_user: str | None = None) -> Decision:
        """Decide one RCPT TO address (as parsed by the SMTP layer, source route already dropped)."""
        if self.postmaster and address.lower().rstrip(".") in self.postmaster_names:
            return self._postmaster()
        local, domain = split_address(address)
        normalised = f"{local}@{domain}"
        if not local or not domain:
            return Decision(None, Reply(501, "5.1.3", "Bad recipient address syntax"), normalised)
        bare_local = unquote_local(local)
        is_literal = domain.startswith("[")
        if f"{bare_local}@{domain}".lower() in self.feedback_addresses:
            return Decision(ROUTE_FEEDBACK, None, normalised)
        if not is_literal and domain in self.feedback_domains:
            if not looks_like_return_path(bare_local):
                return Decision(None, NO_SUCH_USER, normalised)
            return Decision(ROUTE_FEEDBACK, None, normalised)
        if not is_literal and self.srs is not None and domain == self.srs.domain and is_srs(bare_local):
            return self._reverse_srs(normalised, peer_address, auth_user)
        if not is_literal and (domain in self.local_domains or domain in self.tables.virtual_domains
                               or f"{bare_local.lower()}@{domain}" in self.tables.virtual):  # fmt: skip
            if any(c in bare_local for c in "%!@"):
                return Decision(None, ROUTING_DENIED, normalised)
            return self._expanded(normalised)
        if not is_literal and domain in self.forward_domains:
            if any(c in bare_local for c in "%!@"):
                return Decision(None, ROUTING_DENIED, normalised)
            return Decision(ROUTE_FORWARD, None, normalised)
        if self.may_relay(peer_address, auth_user):
            return Decision(ROUTE_RELAY, None, normalised)
        return Decision(None, RELAY_DENIED, normalised)

    # -- aliases, virtual maps, recipient delimiter ------------------------------------------

    def split_extension(self, address: str) -> tuple[str, str]:
        """``alice+tag@d`` -> (``alice@d``, ``tag``) with the recipient delimiter; else (address, "")."""
        local, domain = split_address(address)
        return split_delimiter(f"{local}@{domain}", self.delimiter)

    def mailbox_listed(self, address: str) -> bool:
        """A local mailbox by that name (or its name without the extension) is configured."""
        if self.mailboxes is None:
            return True
        base, _ = self.split_extension(address)
        return address.lower() in self.mailboxes or base.lower() in self.mailboxes or (
            bool(self.postmaster) and address.lower() == (self.postmaster or "").lower())

    def alias_targets(self, address: str) -> tuple[str, ...] | None:
        """One step of expansion: what ``address`` is an alias for (qualified addresses), or None.

        Order: ``[virtual]`` ``user@domain`` (with, then without the extension); for local domains
        ``user@`` and the aliases file; then, when no mailbox has that name, the role names
        (postmaster, abuse, MAILER-DAEMON: the configured postmaster) and the ``@domain`` catch-all.
        """
        local, domain = split_address(address)
        local = unquote_local(local).lower()
        base, ext = self.split_extension(f"{local}@{domain}")
        base_local = base.rpartition("@")[0]
        virtual, is_local = self.tables.virtual, domain in self.local_domains
        for key, propagate in ((f"{local}@{domain}", ""), (base, ext)):
            if key in virtual:
                return self._qualified(virtual[key], domain, propagate)
        if is_local:
            for name, propagate in ((local, ""), (base_local, ext)):
                if f"{name}@" in virtual:
                    return self._qualified(virtual[f"{name}@"], domain, propagate)
                if name in self.tables.aliases:
                    return self._qualified(self.tables.aliases[name], domain, propagate)
            if self.mailbox_listed(address):
                return None  # _final checks its path
            if self.postmaster and base_local in ROLE_NAMES and base.lower() != self.postmaster.lower():
                return (self.postmaster,)
        if f"@{domain}" in virtual:
            return self._qualified(virtual[f"@{domain}"], domain, ext)
        return None

    def _qualified(self, targets: tuple[str, ...], domain: str, extension: str) -> tuple[str, ...]:
        """Bare names get the alias's domain; an unmatched extension goes on to local targets."""
        out = []
        for target in targets:
            literal = "\\" if target.startswith("\\") else ""
            target = target.lstrip("\\")
            local, at, target_domain = target.rpartition("@")
            if not at:
                local, target_domain = target, domain
            target_domain = target_domain.lower()
            if extension and target_domain in self.local_domains and self.delimiter not in local:
                local = f"{local}{self.delimiter}{extension}"
            out.append(f"{literal}{local}@{target_domain}")
        return tuple(out)

    def _expanded(self, address: str) -> Decision:
        """A recipient in one of our domains, through aliases and virtual maps to its final addresses."""
        expansion = expand(address, self.alias_targets, self.max_depth, self.max_expansion)
        if expansion.refused is not None:
            return Decision(None, expansion.refused, address)
        targets: list[Target] = []
        for final, via_alias in expansion.finals:
            targets.append(self._final(final, via_alias))
        targets.extend(Target(failed, None, reply) for failed, reply in expansion.failures)
        deliverable = [t for t in targets if t.route is not None]
        if not deliverable:
            return Decision(None, targets[0].reply, address)
        if len(targets) == 1 and targets[0].address == address:
            return Decision(deliverable[0].route, None, address)
        return Decision(deliverable[0].route, None, deliverable[0].address, tuple(targets), address)

    def _final(self, address: str, via_alias: bool) -> Target:
        """Where a final address goes: a local mailbox, a forward domain, or (through an alias) away."""
        local, domain = split_address(address)
        if domain in self.local_domains:
            if not self.mailbox_listed(address):
                return Target(address, None, NO_SUCH_USER)
            if mailbox_path(self.mail_root, self.split_extension(address)[0]) is None:  # the form delivery gets
                return Target(address, None, BAD_MAILBOX_NAME)
            return Target(address, ROUTE_LOCAL)
        if f"{unquote_local(local)}@{domain}".lower() in self.feedback_addresses:
            return Target(address, ROUTE_FEEDBACK)
        if domain in self.forward_domains:
            return Target(address, ROUTE_FORWARD)
        if domain in self.tables.virtual_domains:
            return Target(address, None, NO_SUCH_USER)  # a virtual alias domain has no mailboxes
        return Target(address, ROUTE_RELAY, forwarded=via_alias)

    def _reverse_srs(self, address: str, peer_address: str, auth_user: str | None) -> Decision:
        """A bounce to one of our SRS addresses goes to the original sender; a forged one is refused."""
        assert self.srs is not None
        now = self.clock.seconds() if self.clock is not None else 0.0
        try:
            original = self.srs.reverse(address, now)
        except SRSError as e:
            return Decision(None, Reply(550, "5.7.1", f"Invalid SRS address: {e}"), address)
        _, domain = split_address(original)
        if domain in self.local_domains or domain in self.forward_domains or domain in self.tables.virtual_domains:
            decision = self.recipient(original, peer_address, auth_user)
        else:
            decision = Decision(ROUTE_RELAY, None, original)
        if decision.reply is not None:
            return decision
        return Decision(decision.route, None, decision.address, decision.deliveries(), address)

    def over_quota(self, address: str, size: int = 0) -> bool:
        """The local mailbox of ``address`` is known (from its ``maildirsize``) to be full, or too
        full for ``size`` more octets. Unknown usage is not over quota: delivery checks again."""
        if self.quotas is None:
            return False
        base, _ = self.split_extension(address)
        limit = self.quotas.limit_for(base)
        path = mailbox_path(self.mail_root, base) if limit else None
        used = known_usage(path, limit) if path is not None else None
        return used is not None and (used >= limit or used + size > limit)

    def queue_recipients(self, targets: tuple[Target, ...], address: str, orcpt: str | None, notify: Any,
                         sender: str, now: float, seen: set[str] | None = None) -> list[Recipient]:  # fmt: skip
        """The queue's recipients for ``address`` expanded into ``targets``: the original kept as ORCPT
        (as Postfix does when the client gave none), forwarded ones with an SRS sender, failed branches
        already failed (a DSN tells the sender); addresses in ``seen`` are left out (and added)."""
        seen = set() if seen is None else seen
        out = []
        for target in targets:
            if target.address.lower() in seen:
                continue
            seen.add(target.address.lower())
            rcpt = Recipient(address=target.address, route=target.route or ROUTE_LOCAL,
                             orcpt=orcpt or f"rfc822;{address}", notify=notify)  # fmt: skip
            if target.route is None and target.reply is not None:
                rcpt.state, rcpt.updated = FAILED, now
                rcpt.reply = {"code": target.reply.code, "enhanced": target.reply.enhanced,
                              "text": f"{target.reply.text} (expanding <{address}>)"}  # fmt: skip
            elif target.forwarded:
                rcpt.sender = self.forward_sender(sender, now)
            out.append(rcpt)
        return out

    def forward_sender(self, sender: str, now: float) -> str:
        """The envelope sender for forwarded targets: SRS-rewritten when ``[srs]`` is configured."""
        if self.srs is None or not sender or split_address(sender)[1] in self.local_domains:
            return sender  # the null sender stays null; our own domains pass SPF as they are
        return self.srs.forward(sender, now)

    def _postmaster(self) -> Decision:
        """The configured postmaster mailbox, routed as its domain says (never refused as relaying)."""
        address = self.postmaster or ""
        local, domain = split_address(address)
        normalised = f"{local}@{domain}"
        if domain in self.local_domains:
            if mailbox_path(self.mail_root, normalised) is None:
                return Decision(None, BAD_MAILBOX_NAME, normalised)
            return self._expanded(normalised)  # the postmaster address may be an alias itself
        if domain in self.forward_domains:
            return Decision(ROUTE_FORWARD, None, normalised)
        return Decision(ROUTE_RELAY, None, normalised)
