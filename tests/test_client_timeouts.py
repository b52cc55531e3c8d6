"""Every SMTP client stage is bounded by its own timeout (RFC 5321 §4.5.3.2), the data block
included: on task.Clock with an in-memory transport that can stop taking data, and once against a
real receiver over TCP that stops reading in the middle of DATA."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from pymta.envelope import DEFERRED, Envelope, Recipient, new_qid
from pymta.outbound.delivery import SMTPDeliveryAgent
from pymta.smtp.client import (
    DATA_CHUNK,
    ClientTimeouts,
    ReplyTimeout,
    SMTPClientProtocol,
    transact,
)
from pymta.smtp.content import encode_data
from tests.dnsserver import loopback_router
from tests.mta_process import free_port

TIMEOUTS = ClientTimeouts(mail=300, rcpt=301, data=120, data_block=180, data_end=600, rset=60, quit=10)


class SlowTransport(StringTransport):
    """Holds at most ``window`` unread bytes: past it the producer is paused, as a socket whose
    peer stopped reading pauses it; :meth:`drain` is the peer reading everything."""

    def __init__(self, window: int = 4 * DATA_CHUNK) -> None:
        super().__init__()
        self.window = window
        self.unread = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        if self.unread > self.window and self.producer is not None and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unread = 0
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


def connected(transport: StringTransport | None = None) -> tuple[SMTPClientProtocol, StringTransport, task.Clock]:
    clock = task.Clock()
    proto = SMTPClientProtocol(clock)
    transport = transport if transport is not None else SlowTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def start_transaction(proto: SMTPClientProtocol, payload: bytes = b"x\r\n.\r\n") -> list:
    outcome: list = []
    transact(proto, "MAIL FROM:<s@a.test>", ["RCPT TO:<r@b.test>"], payload, TIMEOUTS).addBoth(outcome.append)
    return outcome


@pytest.mark.parametrize(
    ("stage", "answers", "timeout"),
    [("mail", [], 300), ("rcpt", [b"250 ok\r\n"], 301), ("data", [b"250 ok\r\n", b"250 ok\r\n"], 120)],
)
def test_each_command_stage_waits_for_its_own_timeout_then_aborts(stage, answers, timeout):
    proto, transport, clock = connected()
    outcome = start_transaction(proto)
    for answer in answers:
        clock.advance(1)
        proto.dataReceived(answer)
    clock.advance(timeout - 1)
    assert outcome == [], stage
    assert not getattr(transport, "aborted", False), stage
    clock.advance(2)
    assert len(outcome) == 1, stage
    assert isinstance(outcome[0].value, ReplyTimeout), stage
    assert f"{timeout:g}s" in str(outcome[0].value)
    assert transport.aborted


@pytest.mark.parametrize(("stage", "timeout"), [("ehlo", 300), ("starttls", 120)])
def test_ehlo_and_starttls_wait_for_their_own_timeouts(stage, timeout):
    proto, transport, clock = connected()
    timeouts = ClientTimeouts(ehlo=300, starttls=120)
    outcome: list = []
    if stage == "ehlo":
        proto.hello("client.test", timeouts).addBoth(outcome.append)
    else:
        proto.starttls(None, "client.test", timeouts).addBoth(outcome.append)
    assert transport.value().startswith(stage.upper().encode())
    clock.advance(timeout - 1)
    assert outcome == []
    clock.advance(2)
    assert len(outcome) == 1
    assert isinstance(outcome[0].value, ReplyTimeout)
    assert transport.aborted


def test_a_remote_that_stops_reading_mid_data_is_dropped_after_the_data_block_timeout():
    proto, transport, clock = connected()
    payload = encode_data((b"y" * 78 + b"\r\n") * 40000)
    outcome = start_transaction(proto, payload)
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go on\r\n")
    assert transport.paused
    assert outcome == []
    clock.advance(179)
    assert outcome == []
    assert not getattr(transport, "aborted", False)
    clock.advance(2)  # 181 s without progress: well before the 600 s data_end wait
    [result] = outcome
    assert result.data.code == 451
    assert result.data.enhanced == "4.4.2"
    assert "180s" in result.data.text
    assert not result.lost_after_data  # the final dot never left: no duplicate is possible
    assert transport.aborted
    assert not transport.value().endswith(b"\r\n.\r\n")


def test_a_connection_lost_mid_data_is_a_plain_deferral_not_a_possible_duplicate():
    proto, transport, clock = connected()
    outcome = start_transaction(proto, encode_data((b"w" * 78 + b"\r\n") * 40000))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go on\r\n")
    assert transport.paused
    proto.connectionLost(None)
    [result] = outcome
    assert (result.data.code, result.data.enhanced) == (451, "4.4.2")
    assert not result.lost_after_data
    assert "connection lost while sending message data" in result.data.text
    assert clock.getDelayedCalls() == []  # no block timer left behind


def test_a_slow_reader_that_keeps_taking_data_is_not_cut_off_and_data_end_then_applies():
    proto, transport, clock = connected()
    payload = encode_data((b"z" * 78 + b"\r\n") * 40000)
    outcome = start_transaction(proto, payload)
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go on\r\n")
    rounds = 0
    while transport.paused and rounds < 100:  # each block within 170 s: far over 180 s in total
        clock.advance(170)
        transport.drain()
        rounds += 1
    assert rounds >= 3
    assert outcome == []
    assert transport.value().endswith(b"\r\n.\r\n")
    clock.advance(599)  # RFC 5321: up to 10 minutes for the reply after the final dot
    assert outcome == []
    clock.advance(2)
    [result] = outcome
    assert result.lost_after_data
    assert transport.aborted


def test_the_reply_after_the_final_dot_is_taken_within_data_end():
    proto, _transport, clock = connected()
    outcome = start_transaction(proto)
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go on\r\n")
    clock.advance(599)
    proto.dataReceived(b"250 2.0.0 queued\r\n")
    [result] = outcome
    assert result.data.code == 250
    assert not result.lost_after_data


def test_rset_and_quit_are_bounded_and_a_closing_connection_is_aborted():
    from pymta.smtp.client import quit_session

    proto, transport, clock = connected(StringTransport())
    outcome = start_transaction(proto)
    proto.dataReceived(b"250 ok\r\n550 no such user\r\n")  # nobody left: RSET, whose answer never comes
    assert transport.value().endswith(b"RSET\r\n")
    clock.advance(61)
    assert len(outcome) == 1
    assert outcome[0].data is None
    assert transport.disconnecting
    proto, transport, clock = connected(StringTransport())
    done: list = []
    quit_session(proto, TIMEOUTS).addBoth(done.append)
    proto.dataReceived(b"221 bye\r\n")
    assert transport.disconnecting
    assert done == []
    aborts = []
    transport.abortConnection = lambda: (aborts.append(clock.seconds()), proto.connectionLost(None))
    clock.advance(9)
    assert aborts == []
    assert done == []
    clock.advance(2)
    assert aborts == [11]
    assert done == [None]


class StalledReceiver(Protocol):
    """A real SMTP receiver that says 354 and then never reads another byte."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.transport.write(b"220 stall.test ESMTP\r\n")
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-stall.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.transport.write(b"354 go ahead\r\n")
                self.transport.pauseProducing()  # stop reading: the client's writes back up
                self.buffer = b""
                return
            else:
                self.transport.write(b"250 ok\r\n")

    def connectionLost(self, reason=None) -> None:
        self.factory.closed.append(self)


class StalledReceiverTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.port = free_port("127.0.0.2")
        factory = Factory.forProtocol(StalledReceiver)
        factory.connections, factory.closed = [], []
        self.factory = factory
        listening = reactor.listenTCP(self.port, factory, interface="127.0.0.2")
        listening.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # no room to hide a body
        self.addCleanup(listening.stopListening)
        self.router = loopback_router(self, {"stall.test": {"MX": ["10 mx.stall.test."]},
                                             "mx.stall.test": {"A": ["127.0.0.2"]}}, self.port)  # fmt: skip

    @defer.inlineCallbacks
    def test_a_server_that_never_greets_is_left_after_the_greeting_timeout(self):
        silent = Factory.forProtocol(Protocol)
        port = free_port("127.0.0.3")
        listening = reactor.listenTCP(port, silent, interface="127.0.0.3")
        self.addCleanup(listening.stopListening)
        router = loopback_router(self, {"mute.test": {"MX": ["10 mx.mute.test."]}, "mx.mute.test": {"A": ["127.0.0.3"]}},
                                 port)  # fmt: skip
        agent = SMTPDeliveryAgent(reactor, router, "client.test", timeouts=ClientTimeouts(connect=2, greeting=1))
        env = Envelope(qid=new_qid(), sender="s@a.test", recipients=[Recipient("r@mute.test")])
        [result] = yield agent.deliver(env, env.recipients, b"x\r\n")
        assert (result.status, result.enhanced) == (DEFERRED, "4.4.2")
        assert "no reply within 1s" in result.text

    @defer.inlineCallbacks
    def test_a_receiver_that_stops_reading_mid_data_is_dropped_after_data_block_not_data_end(self):
        router = self.router
        timeouts = ClientTimeouts(connect=2, greeting=5, ehlo=5, data_block=1, data_end=600)
        agent = SMTPDeliveryAgent(reactor, router, "client.test", timeouts=timeouts, idle_timeout=0.1)
        self.addCleanup(agent.close_idle)
        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8192  # 8 MB: more than every socket buffer
        env = Envelope(qid=new_qid(), sender="s@a.test", recipients=[Recipient("r@stall.test")])
        [result] = yield agent.deliver(env, env.recipients, body)  # the test's 60 s limit < data_end
        assert (result.status, result.code, result.enhanced) == (DEFERRED, 451, "4.4.2")
        assert "Message data not sent" in result.text
        assert "no message data for 1s" in result.text
        for receiver in self.factory.connections:
            receiver.transport.resumeProducing()  # reading again, it finds the connection reset
        for _ in range(100):  # bounded poll
            if self.factory.closed:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert len(self.factory.connections) == 1
        assert self.factory.closed == self.factory.connections
