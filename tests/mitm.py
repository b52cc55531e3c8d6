"""A STARTTLS-stripping man in the middle for tests: a TCP proxy on loopback that passes a client
through to a real SMTP server but removes the STARTTLS line from the server's EHLO replies (and
keeps the multi-line reply well formed), as a downgrade attacker on the path would."""

from __future__ import annotations

from twisted.internet import protocol, reactor


class _ToServer(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.client.server = self
        self.factory.client.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.factory.client.from_server(data)

    def connectionLost(self, reason=None) -> None:
        self.factory.client.transport.loseConnection()


class _FromClient(protocol.Protocol):
    def __init__(self) -> None:
        self.server: _ToServer | None = None
        self.buffer = b""
        self.reply: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        f = protocol.ClientFactory()
        f.protocol = _ToServer
        f.client = self
        proxy = self.factory.proxy
        reactor.connectTCP(proxy.target[0], proxy.target[1], f, timeout=5)

    def dataReceived(self, data: bytes) -> None:
        self.factory.proxy.client_bytes += data
        if self.server is not None:
            self.server.transport.write(data)

    def from_server(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            line += b"\n"
            self.reply.append(line)
            if line[3:4] != b"-":  # the last line of a reply
                lines = [x for x in self.reply if x[4:].strip().upper() != b"STARTTLS"]
                if len(lines) < len(self.reply):
                    self.factory.proxy.stripped += 1
                    lines[-1] = lines[-1][:3] + b" " + lines[-1][4:]
                self.reply = []
                self.transport.write(b"".join(lines))

    def connectionLost(self, reason=None) -> None:
        if self.server is not None:
            self.server.transport.loseConnection()


class StrippingProxy:
    """Listens on ``address``:``port`` and relays to ``target`` (address, port)."""

    def __init__(self, address: str, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.stripped = 0  # EHLO replies that had STARTTLS removed
        self.client_bytes = b""
        f = protocol.ServerFactory()
        f.protocol = _FromClient
        f.proxy = self
        self.listening = reactor.listenTCP(port, f, interface=address)

    def stop(self):
        return self.listening.stopListening()
