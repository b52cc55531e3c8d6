"""Per-client limits (connections, message and recipient rates) and greylisting, on an injected clock.

Trusted clients (``relay_from`` networks, authenticated users) are never limited or greylisted:
the caller decides that and does not ask.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from pymta.inbound.policy import parse_ip
from pymta.rate import KeyedLimiter, Rate
from pymta.smtp.replies import Reply

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try again later")


def client_key(address: str, v4_prefix: int = 32, v6_prefix: int = 64) -> str:
    """The network a client is counted under: its IPv4 address (or /v4_prefix), its IPv6 /64."""
    ip = parse_ip(address)
    if ip is None:
        return address
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class ClientLimits:
    """Connections per client at a time; messages (MAIL) and recipients (RCPT) per client per period."""

    def __init__(
        self,
        clock: Any,
        connections_per_client: int | None = None,
        message_rate: Rate | None = None,
        recipient_rate: Rate | None = None,
    ) -> None:
        self.connections_per_client = connections_per_client
        self.connections: dict[str, int] = {}
        self.messages = KeyedLimiter(message_rate, clock) if message_rate else None
        self.recipients = KeyedLimiter(recipient_rate, clock) if recipient_rate else None

    def connected(self, address: str) -> Reply | None:
        key = client_key(address)
        count = self.connections.get(key, 0) + 1
        self.connections[key] = count
        if self.connections_per_client is not None and count > self.connections_per_client:
            return TOO_MANY_CONNECTIONS
        return None

    def disconnected(self, address: str) -> None:
        key = client_key(address)
        count = self.connections.get(key, 0) - 1
        if count > 0:
            self.connections[key] = count
        else:
            self.connections.pop(key, None)

    def message(self, address: str) -> Reply | None:
        return self._take(self.messages, address, "messages")

    def recipient(self, address: str) -> Reply | None:
        return self._take(self.recipients, address, "recipients")

    @staticmethod
    def _take(limiter: KeyedLimiter | None, address: str, what: str) -> Reply | None:
        if limiter is None:
            return None
        wait = limiter.take(client_key(address))
        if wait:
            return Reply(450, "4.7.1", f"Too many {what} from your address ({limiter.rate}), try again in {int(wait) + 1}s")
        return None


class Greylist:
    """Greylisting of (client /24 or /64, sender, recipient) triples, RFC 6647 style.

    A new triple gets 450 4.7.1; a retry after ``delay`` and within ``expire`` passes, and the
    triple then passes for ``lifetime`` (renewed on every pass).
    """

    def __init__(self, clock: Any, delay: float, expire: float, lifetime: float, max_entries: int = 1_000_000) -> None:
        self.clock = clock
        self.delay = delay
        self.expire = expire
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[str, str, str], list[float]] = OrderedDict()  # key -> [first_seen, pass_until]

    def check(self, client: str, sender: str, recipient: str) -> Reply | None:
        now = self.clock.seconds()
        key = (client_key(client, v4_prefix=24), sender.lower(), recipient.lower())
        entry = self.entries.get(key)
        if entry is not None and entry[1] >= now:
            entry[1] = now + self.lifetime
            self.entries.move_to_end(key)
            return None
        if entry is None or now - entry[0] > self.expire:
            entry = [now, 0.0]
            self.entries[key] = entry
            self.entries.move_to_end(key)
            if len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        waited = now - entry[0]
        if waited >= self.delay:
            entry[1] = now + self.lifetime
            return None
        return Reply(450, "4.7.1", f"Greylisted, please try again in {int(self.delay - waited) + 1} seconds")
