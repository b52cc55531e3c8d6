"""Per-client limits (connections, message and recipient rates) and greylisting, on an injected clock.

Trusted clients (``relay_from`` networks, authenticated users) are never limited or greylisted:
the caller decides that and does not ask. With the cluster's state every answer is a Deferred.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from pymta.inbound.policy import parse_ip
from pymta.interfaces import IInboundState
from pymta.rate import Rate
from pymta.smtp.replies import Reply
from pymta.state.memory import MemoryInboundState


def then(answer: Any, step: Callable[[Any], Any]) -> Any:
    """``step(answer)``, or a Deferred of it when the state answered with a Deferred."""
    if isinstance(answer, defer.Deferred):
        return answer.addCallback(step)
    return step(answer)


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
        # An IInboundState: mypy reads a zope Interface's methods without ``self``.
        self.state: Any = state if state is not None else MemoryInboundState(clock)

    def connected(self, address: str) -> Reply | Any | None:
        """None if the connection is allowed (and counted: call :meth:`disconnected` later); a
        Deferred of the answer from a state across the network."""
        if self.connections_per_client is None:
            return None
        counted = self.state.acquire_connection(client_key(address), self.connections_per_client)
        return then(counted, lambda ok: None if ok else TOO_MANY_CONNECTIONS)

    def disconnected(self, address: str) -> Any:
        """The counted connection has ended (a Deferred from a state across the network)."""
        if self.connections_per_client is not None:
            return self.state.release_connection(client_key(address))
        return None

    def message(self, address: str) -> Reply | None:
        return self._take(self.message_rate, address, "messages")

    def recipient(self, address: str) -> Reply | None:
        return self._take(self.recipient_rate, address, "recipients")

    def _take(self, rate: Rate | None, address: str, what: str) -> Reply | Any | None:
        if rate is None:
            return None

        def reply(wait: float) -> Reply | None:
            if wait:
                return Reply(450, "4.7.1", f"Too many {what} from your address ({rate}), try again in {int(wait) + 1}s")
            return None

        return then(self.state.take(what, client_key(address), rate), reply)


class Greylist:
    """Greylisting of (client /24 or /64, sender, recipient) triples, RFC 6647 style.

    A new triple gets 450 4.7.1; a retry after ``delay`` and within ``expire`` passes, and the
    triple then passes for ``lifetime`` (renewed on every pass). The triples live in ``state``.
    """

    def __init__(
        self, clock: Any, delay: float, expire: float, lifetime: float, state: IInboundState | None = None
    ) -> None:  # fmt: skip
        self.delay = delay
        self.expire = expire
        self.lifetime = lifetime
        # An IInboundState: mypy reads a zope Interface's methods without ``self``.
        self.state: Any = state if state is not None else MemoryInboundState(clock)

    def check(self, client: str, sender: str, recipient: str) -> Reply | Any | None:
        triple = (client_key(client, v4_prefix=24), sender.lower(), recipient.lower())
        return then(self.state.greylist(triple, self.delay, self.expire, self.lifetime), self._reply)

    @staticmethod
    def _reply(wait: float) -> Reply | None:
        if wait:
            return Reply(450, "4.7.1", f"Greylisted, please try again in {int(wait) + 1} seconds")
        return None
