"""write_now on real loopback TCP: sent at once when nothing is queued, Twisted's queue otherwise,
every byte in order."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor, tcp
from twisted.trial import unittest

from pymta.smtp.sockets import write_now


class Collect(protocol.Protocol):
    def __init__(self, expected: int) -> None:
        self.data = bytearray()
        self.expected = expected
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))


class Send(protocol.Protocol):
    """On connection: runs ``plan(transport)`` and notes what was queued right after."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.queued_after: int | None = None
        self.polled_for_writing: bool | None = None

    def connectionMade(self) -> None:
        self.plan(self.transport)
        t = self.transport
        self.queued_after = t._tempDataLen + len(t.dataBuffer) - t.offset
        self.polled_for_writing = t in reactor.getWriters()


class WriteNowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def exchange(self, plan, expected: int):
        sender = Send(plan)
        server = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: sender), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        receiver = Collect(expected)
        client = yield protocol.ClientCreator(reactor, lambda: receiver).connectTCP("127.0.0.1", server.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        got = yield receiver.done.addTimeout(30, reactor)
        return sender, got

    @defer.inlineCallbacks
    def test_an_answer_goes_to_the_socket_at_once_without_polling_for_writability(self):
        sender, got = yield self.exchange(lambda t: write_now(t, b"250 2.0.0 Ok\r\n"), 14)
        assert isinstance(sender.transport, tcp.Connection)
        assert sender.queued_after == 0
        assert sender.polled_for_writing is False
        assert got == b"250 2.0.0 Ok\r\n"

    @defer.inlineCallbacks
    def test_behind_queued_data_it_is_queued_too_and_the_order_holds(self):
        def plan(t):
            t.write(b"first ")
            write_now(t, b"second")

        sender, got = yield self.exchange(plan, 12)
        assert sender.queued_after == 12  # nothing went ahead of the queued bytes
        assert got == b"first second"

    @defer.inlineCallbacks
    def test_what_the_socket_does_not_take_is_queued_and_everything_arrives_in_order(self):
        big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than a loopback socket takes at once
        sender, got = yield self.exchange(lambda t: (write_now(t, big), write_now(t, b"tail")), len(big) + 4)
        assert 0 < sender.queued_after < len(big) + 4
        assert got == big + b"tail"
