"""DNS blocklist check at connect, through the project's resolver: a client listed in any
configured zone is refused with the configured reply (an answer in 127.0.0.0/8 means listed)."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pymta.dns import DNSError
from pymta.inbound.policy import parse_ip
from pymta.smtp.replies import Reply

log = Logger(namespace="pymta.inbound.dnsbl")


def query_name(address: str, zone: str) -> str | None:
    """``2.0.0.192.zone`` for 192.0.2.2 (nibbles for IPv6), or None for a non-IP."""
    ip = parse_ip(address)
    if ip is None:
        return None
    pointer = ip.reverse_pointer
    suffix = ".in-addr.arpa" if ip.version == 4 else ".ip6.arpa"
    return pointer[: -len(suffix)] + "." + zone


class DNSBL:
    def __init__(self, resolver: Any, zones: tuple[str, ...], reply: Reply) -> None:
        self.resolver = resolver
        self.zones = zones
        self.reply = reply

    @defer.inlineCallbacks
    def check(self, address: str) -> Any:
        for zone in self.zones:
            name = query_name(address, zone)
            if name is None:
                return None
            try:
                answers = yield self.resolver.lookup_addresses(name)
            except DNSError:
                continue  # not listed (NXDOMAIN) or the list is unreachable: never refuse on a failure
            if any(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8") for a in answers if ":" not in a):
                log.debug("{client} listed in {zone}", client=address, zone=zone, event="dnsbl")  # the reject names it
                return Reply(self.reply.code, self.reply.enhanced, f"{self.reply.text} ({zone})")
        return None
