"""A small authoritative DNS server for tests, on dnspython: UDP and TCP on 127.0.0.1, port 0
(or a given loopback address and port, e.g. port 53 for tools that only use resolv.conf).

The zone is data: ``{"name.": {"MX": ["10 mx1.name."], "A": ["127.0.0.2"], ...}}``. Names in
``servfail`` answer SERVFAIL; names in ``silent`` never answer (a timeout); unknown names are
NXDOMAIN with an SOA for negative caching; CNAMEs are followed inside the zone. Runs in its own
threads, so a twistd under test (another process) can use it as well as in-process code.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

TTL = 60
SOA = "ns.test. hostmaster.test. 1 3600 600 86400 30"


class Zone:
    def __init__(self, records: dict[str, dict[str, list[str]]], servfail=(), silent=()) -> None:
        self.records = {k.lower().rstrip(".") + ".": v for k, v in records.items()}
        self.servfail = {n.lower().rstrip(".") + "." for n in servfail}
        self.silent = {n.lower().rstrip(".") + "." for n in silent}
        self.queries: list[tuple[str, str]] = []

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        current = name
        for _ in range(8):  # follow CNAMEs inside the zone
            node = self.records.get(current)
            if node is None:
                if current == name:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(dns.rrset.from_text("test.", TTL, "IN", "SOA", SOA))
                return response.to_wire()
            if rdtype in node:
                response.answer.append(dns.rrset.from_text_list(current, TTL, "IN", rdtype, node[rdtype]))
                return response.to_wire()
            if "CNAME" in node and rdtype != "CNAME":
                target = node["CNAME"][0].lower()
                response.answer.append(dns.rrset.from_text_list(current, TTL, "IN", "CNAME", node["CNAME"]))
                current = target if target.endswith(".") else target + "."
                continue
            response.authority.append(dns.rrset.from_text("test.", TTL, "IN", "SOA", SOA))
            return response.to_wire()
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()


class DNSServer:
    """Start with :meth:`start`; ``address`` is "127.0.0.1:PORT"; stop with :meth:`stop`."""

    def __init__(self, zone: Zone, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = zone
        zone_ref = zone

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = zone_ref.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                try:
                    head = self.request.recv(2)
                    (length,) = struct.unpack("!H", head)
                    data = b""
                    while len(data) < length:
                        chunk = self.request.recv(length - len(data))
                        if not chunk:
                            return
                        data += chunk
                except (OSError, struct.error):
                    return
                reply = zone_ref.answer(data)
                if reply is not None:
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)

        self.udp = socketserver.ThreadingUDPServer((host, port), UDPHandler)
        port = self.udp.server_address[1]
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        try:
            self.tcp: Any = socketserver.ThreadingTCPServer((host, port), TCPHandler)
        except OSError:
            self.tcp = None
        self.port = port
        self.host = host
        self.address = f"{host}:{port}"
        self.threads: list[threading.Thread] = []

    def start(self) -> DNSServer:
        for server in (self.udp, self.tcp):
            if server is None:
                continue
            server.daemon_threads = True
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            if server is not None:
                server.shutdown()
                server.server_close()
        for t in self.threads:
            t.join(5)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_router(case: Any, zone: dict, smtp_port: int, **router_options: Any) -> Any:
    """A :class:`pymta.outbound.routes.Router` over pymta's resolver asking a DNSServer for ``zone``;
    the server and the resolver's thread pool are stopped by the test case's cleanups."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from pymta.dns import Resolver
    from pymta.outbound.routes import Router

    server = DNSServer(zone if isinstance(zone, Zone) else Zone(zone)).start()
    case.addCleanup(server.stop)
    pool = ThreadPool(1, 2)
    pool.start()
    case.addCleanup(pool.stop)
    return Router(Resolver(reactor, pool, [server.address], timeout=1.0), smtp_port=smtp_port, **router_options)
