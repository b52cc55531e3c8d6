"""Per-client limits (connections, message and recipient rates) and greylisting, on an injected clock.

Trusted clients (``relay_from`` networks, authenticated users) are never limited or greylisted:
the caller decides that and does not ask.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pymta.inbound.policy import parse_ip
from pymta.interfaces import IInboundState
from pymta.rate import Rate
from pymta.smtp.replies import Reply
from pymta.state.memory import MemoryInboundState

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try again later")


def client_key(address: str, v4_prefix: int = 32, v6_prefix: int = 64) -> str:
    """The network a client is counted under: its IPv4 address (or /v4_prefix), its IPv6 /64."""
    ip = parse_ip(address)
    if ip is None:
        return address
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class ClientLimits:
    """Connections per client at a time; messages (MAIL) and recipients (RCPT) per client per period.

    The counts live in ``state`` (an :class:`IInboundState`): in-process by default, or the
    node's shared store so that every listener process sees the same counts.
    """

    def __init__(
        self,
        clock: Any,
        connections_per_client: int | None = None,
        message_rate: Rate | None = None,
        recipient_rate: Rate | None = None,
        state: IInboundState | None = None,
    ) -> None:
        self.connections_per_client = connections_per_client
        self.message_rate = message_rate
        self.recipient_rate = recipient_rate
        self.state = state if state is not None else MemoryInboundState(clock)

    def connected(self, address: str) -> Reply | None:
        """None if the connection is allowed (and counted: call :meth:`disconnected` later)."""
        if self.connections_per_client is None:
            return None
        if not self.state.acquire_connection(client_key(address), self.connections_per_client):
            return TOO_MANY_CONNECTIONS
        return None

    def disconnected(self, address: str) -> None:
        if self.connections_per_client is not None:
            self.state.release_connection(client_key(address))

    def message(self, address: str) -> Reply | None:
        return self._take(self.message_rate, address, "messages")

    def recipient(self, address: str) -> Reply | None:
        return self._take(self.recipient_rate, address, "recipients")

    def _take(self, rate: Rate | None, address: str, what: str) -> Reply | None:
        if rate is None:
            return None
        wait = self.state.take(what, client_key(address), rate)
        if wait:
            return Reply(450, "4.7.1", f"Too many {what} from your address ({rate}), try again in {int(wait) + 1}s")
        return None


class Greylist:
    """Greylisting of (client /24 or /64, sender, recipient) triples, RFC 6647 style.

    A new triple gets 450 4.7.1; a retry after ``delay`` and within ``expire`` passes, and the
    triple then passes for ``lifetime`` (renewed on every pass). The triples live in ``state``.
    """

    def __init__(
        self, clock: Any, delay: float, expire: float, lifetime: float, state: IInboundState | None = None,
        cluster: Any = None,
    ) -> None:  # fmt: skip
        self.delay = delay
        self.expire = expire
        self.lifetime = lifetime
        self.state = state if state is not None else MemoryInboundState(clock)
        self.cluster = cluster  # IClusterState: the triples are the cluster's (a Deferred answer)

    def check(self, client: str, sender: str, recipient: str) -> Reply | None | Any:
        triple = (client_key(client, v4_prefix=24), sender.lower(), recipient.lower())
        if self.cluster is not None:
            return self.cluster.greylist(triple, self.delay, self.expire, self.lifetime).addCallback(self._reply)
        return self._reply(self.state.greylist(triple, self.delay, self.expire, self.lifetime))

    @staticmethod
    def _reply(wait: float) -> Reply | None:
        if wait:
            return Reply(450, "4.7.1", f"Greylisted, please try again in {int(wait) + 1} seconds")
        return None
