"""Who may send to whom: relay control and local-mailbox checks at the RCPT stage.

Never an open relay: a recipient is accepted only for a local domain (existing, safe mailbox),
a forward domain, or — from a ``relay_from`` network or an authenticated client — for relay.
Sender-specified routing in any disguise (``%`` hack, ``!`` paths, a quoted local part holding
``@``, source routes, IP literals, case and trailing-dot variants) never turns into a relay.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pymta.envelope import ROUTE_FEEDBACK, ROUTE_FORWARD, ROUTE_LOCAL, ROUTE_RELAY
from pymta.inbound.mailbox import mailbox_path
from pymta.smtp.replies import Reply

FEEDBACK_TOKEN = re.compile(r"^[bu]-[0-9A-Za-z]{16,32}-[A-Za-z2-7]{16}(=[A-Za-z0-9.-]{1,253})?$")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
ROUTING_DENIED = Reply(550, "5.7.1", "Sender-specified routing is not allowed")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
BAD_MAILBOX_NAME = Reply(550, "5.1.1", "Mailbox name not acceptable here")


@dataclass(frozen=True, slots=True)
class Decision:
    """Either a route for an accepted recipient, or the reply refusing it."""

    route: str | None
    reply: Reply | None
    address: str  # the normalised address (domain lower-cased, no trailing dot)


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
            if not FEEDBACK_TOKEN.match(bare_local):
                return Decision(None, NO_SUCH_USER, normalised)
            return Decision(ROUTE_FEEDBACK, None, normalised)
        if not is_literal and domain in self.local_domains:
            if any(c in bare_local for c in "%!@"):
                return Decision(None, ROUTING_DENIED, normalised)
            if self.mailboxes is not None and f"{bare_local}@{domain}".lower() not in self.mailboxes:
                if self.postmaster and bare_local.lower() == "postmaster":
                    return self._postmaster()  # postmaster@ every local domain reaches someone
                if self.postmaster and normalised.lower() == self.postmaster.lower():
                    return Decision(ROUTE_LOCAL, None, normalised)
                return Decision(None, NO_SUCH_USER, normalised)
            if mailbox_path(self.mail_root, normalised) is None:  # the form the delivery agent gets
                return Decision(None, BAD_MAILBOX_NAME, normalised)
            return Decision(ROUTE_LOCAL, None, normalised)
        if not is_literal and domain in self.forward_domains:
            if any(c in bare_local for c in "%!@"):
                return Decision(None, ROUTING_DENIED, normalised)
            return Decision(ROUTE_FORWARD, None, normalised)
        if self.may_relay(peer_address, auth_user):
            return Decision(ROUTE_RELAY, None, normalised)
        return Decision(None, RELAY_DENIED, normalised)

    def _postmaster(self) -> Decision:
        """The configured postmaster mailbox, routed as its domain says (never refused as relaying)."""
        address = self.postmaster or ""
        local, domain = split_address(address)
        normalised = f"{local}@{domain}"
        if domain in self.local_domains:
            if mailbox_path(self.mail_root, normalised) is None:
                return Decision(None, BAD_MAILBOX_NAME, normalised)
            return Decision(ROUTE_LOCAL, None, normalised)
        if domain in self.forward_domains:
            return Decision(ROUTE_FORWARD, None, normalised)
        return Decision(ROUTE_RELAY, None, normalised)
