"""Outbound delivery end to end on loopback: a real DNS server, real SMTP peers on 127.0.0.x
(pymta's own server with scripted answers, and Postfix's smtp-sink), real TCP."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer

from pymta.dns import Resolver
from pymta.envelope import DEFERRED, DELIVERED, FAILED, RELAYED, Envelope, Recipient, new_qid
from pymta.interfaces import ISMTPServerDelegate
from pymta.outbound.delivery import SMTPDeliveryAgent
from pymta.outbound.routes import Router
from pymta.outbound.shaping import Limits, Shaper
from pymta.smtp.client import ClientTimeouts
from pymta.smtp.content import encode_data
from pymta.smtp.replies import Reply
from pymta.smtp.server import ServerLimits, SMTPServerFactory
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import free_port


class Peer:
    """pymta's server as a scripted remote MX: records raw bytes and messages."""

    def __init__(self, address: str, answers: dict | None = None, disabled=frozenset()) -> None:
        self.address = address
        self.answers = answers or {}
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.raw = b""
        self.connections = 0
        self.drop_after_data = False
        peer = self

        @implementer(ISMTPServerDelegate)
        class Delegate:
            def connected(self, session):
                peer.connections += 1
                return peer.answers.get("connect")

            def helo(self, session, name):
                return None

            def mail_from(self, session, sender, params):
                session.notes["params"] = dict(params)
                return peer.answers.get("mail")

            def rcpt_to(self, session, address, params):
                return peer.answers.get(address)

            def message(self, session, body):
                if peer.drop_after_data:
                    session.notes["proto"].transport.abortConnection()
                    return defer.Deferred()
                t = session.transaction
                peer.messages.append((t.sender, [r.address for r in t.recipients], body))
                return peer.answers.get("data")

            def disconnected(self, session):
                return None

        self.delegate = Delegate()
        factory = SMTPServerFactory(self.delegate, f"mx.{address}", ServerLimits(), reactor,
                                    disabled_extensions=frozenset(disabled))  # fmt: skip
        build = factory.buildProtocol

        def build_recording(addr):
            proto = build(addr)
            peer.protocols.append(proto)
            proto.session.notes["proto"] = proto
            original = proto.dataReceived

            def data_received(data):
                peer.raw += data
                peer.chunks.append(data)
                original(data)

            proto.dataReceived = data_received
            return proto

        factory.buildProtocol = build_recording
        self.factory = factory
        self.port = None
        self.protocols: list = []
        self.chunks: list[bytes] = []

    def listen(self, port: int) -> Peer:
        self.port = reactor.listenTCP(port, self.factory, interface=self.address)
        return self

    def stop(self) -> defer.Deferred:
        """Stop listening and close every connection; fires when all are gone."""
        gone = []
        for proto in self.protocols:
            if proto.transport is not None and proto.transport.connected:
                d = defer.Deferred()
                original = proto.connectionLost

                def lost(reason, original=original, d=d):
                    original(reason)
                    d.callback(None)

                proto.connectionLost = lost
                proto.transport.abortConnection()
                gone.append(d)
        if self.port is not None:
            gone.append(defer.maybeDeferred(self.port.stopListening))
        return defer.DeferredList(gone)


ZONE = {
    "remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test."]},
    "mx1.remote.test": {"A": ["127.0.0.2"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "down.test": {"MX": ["10 mx1.down.test.", "20 mx2.remote.test."]},
    "mx1.down.test": {"A": ["127.0.0.9"]},
    "plain.test": {"A": ["127.0.0.3"]},
    "nullmx.test": {"MX": ["0 ."]},
    "self.test": {"MX": ["10 me.self.test."]},
    "me.self.test": {"A": ["127.0.0.1"]},
    "sink.test": {"MX": ["10 sink.test."], "A": ["127.0.0.5"]},
}


class HoldingPeer:
    """A loopback MX that counts its open sessions and holds each final reply until ``release_at``
    messages are waiting (or ``longest`` seconds passed): the peak of held messages is the sender's
    concurrency."""

    def __init__(self, address: str, port: int, release_at: int = 1, longest: float = 1.0) -> None:
        self.release_at, self.longest = release_at, longest
        self.open = self.peak_open = self.peak_held = self.delivered = 0
        self.held: list[defer.Deferred] = []
        self._timer = None
        peer = self

        @implementer(ISMTPServerDelegate)
        class Delegate:
            def connected(self, session):
                peer.open += 1
                peer.peak_open = max(peer.peak_open, peer.open)

            def helo(self, session, name):
                return None

            def mail_from(self, session, sender, params):
                return None

            def rcpt_to(self, session, address, params):
                return None

            def message(self, session, body):
                d = defer.Deferred()
                peer.held.append(d)
                peer.peak_held = max(peer.peak_held, len(peer.held))
                if len(peer.held) >= peer.release_at:
                    peer.release()
                elif peer._timer is None:
                    peer._timer = reactor.callLater(peer.longest, peer.release)
                return d

            def disconnected(self, session):
                peer.open -= 1

        self.delegate = Delegate()
        self.port = reactor.listenTCP(port, SMTPServerFactory(self.delegate, f"mx.{address}", ServerLimits(), reactor),
                                      interface=address)  # fmt: skip

    def release(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        held, self.held = self.held, []
        self.delivered += len(held)
        for d in held:
            d.callback(Reply(250, "2.0.0", "Ok"))

    def stop(self) -> defer.Deferred:
        self.release()
        return defer.maybeDeferred(self.port.stopListening)


class DeliveryTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.port = free_port("127.0.0.2")
        self.dns = DNSServer(Zone(ZONE, servfail=["broken.test"])).start()
        self.addCleanup(self.dns.stop)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        resolver = Resolver(reactor, self.pool, [self.dns.address], timeout=1.0)
        self.router = Router(resolver, smtp_port=self.port, own_listeners=[("127.0.0.1", self.port)])
        self.peers: dict[str, Peer] = {}

    def peer(self, address: str, **kw) -> Peer:
        p = Peer(address, **kw).listen(self.port)
        self.addCleanup(p.stop)
        self.peers[address] = p
        return p

    def agent(self, **kw) -> SMTPDeliveryAgent:
        a = SMTPDeliveryAgent(reactor, self.router, "client.example.test", timeouts=ClientTimeouts(connect=2, greeting=5),
                              idle_timeout=0.2, **kw)  # fmt: skip
        self.addCleanup(a.close_idle)
        return a

    def envelope(self, *rcpts: str, sender: str = "s@example.test", **kw) -> tuple[Envelope, list[Recipient]]:
        recipients = [Recipient(r) for r in rcpts]
        return Envelope(qid=new_qid(), sender=sender, recipients=recipients, **kw), recipients

    @defer.inlineCallbacks
    def test_delivers_to_the_preferred_mx_with_dot_stuffing_byte_correct(self):
        peer = self.peer("127.0.0.2")
        self.peer("127.0.0.3")
        head = b"Subject: dots\r\n\r\n.leading\r\n.\r\n..two\r\n"
        stuffed = len(encode_data(head)) - 3  # without the final ".\r\n"
        filler = b"".join(b"y" * 78 + b"\r\n" for _ in range((16384 - stuffed) // 80 - 1))
        rest = 16384 - stuffed - len(filler)
        filler += b"z" * (rest - 2) + b"\r\n"
        body = head + filler + b".at boundary\r\nend\r\n"
        assert encode_data(body)[16384:16386] == b".."  # the stuffed dot sits exactly at 16 KiB
        env, rcpts = self.envelope("a@remote.test", "b@remote.test")
        results = yield self.agent().deliver(env, rcpts, body)
        assert [r.status for r in results] == [DELIVERED, DELIVERED]
        assert results[0].remote_mta == "mx1.remote.test [127.0.0.2]"
        assert results[0].enhanced == "2.0.0"
        assert peer.messages == [("s@example.test", ["a@remote.test", "b@remote.test"], body)]
        assert b"\r\n..leading\r\n..\r\n...two\r\n" in peer.raw
        assert self.peers["127.0.0.3"].connections == 0

    @defer.inlineCallbacks
    def test_bare_cr_and_lf_go_out_as_crlf(self):
        peer = self.peer("127.0.0.2")
        body = b"Subject: eol\n\nline one\nline two\rline three\r\n"
        env, rcpts = self.envelope("a@remote.test")
        results = yield self.agent().deliver(env, rcpts, body)
        assert results[0].status == DELIVERED
        assert peer.messages[0][2] == b"Subject: eol\r\n\r\nline one\r\nline two\r\nline three\r\n"
        data = peer.raw.split(b"DATA\r\n", 1)[1]
        assert data.count(b"\n") == data.count(b"\r\n")
        assert data.count(b"\r") == data.count(b"\r\n")

    @defer.inlineCallbacks
    def test_falls_back_to_the_next_mx_when_the_first_is_down_or_refuses(self):
        self.peer("127.0.0.3")
        env, rcpts = self.envelope("a@down.test")  # mx1.down.test has no listener
        results = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert results[0].status == DELIVERED
        assert results[0].remote_mta == "mx2.remote.test [127.0.0.3]"
        refusing = self.peer("127.0.0.2", answers={"connect": Reply(421, "4.3.2", "busy")})
        env, rcpts = self.envelope("a@remote.test")
        results = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert refusing.connections == 1
        assert results[0].status == DELIVERED
        assert results[0].remote_mta == "mx2.remote.test [127.0.0.3]"

    @defer.inlineCallbacks
    def test_implicit_mx_uses_the_domain_address(self):
        peer = self.peer("127.0.0.3")
        env, rcpts = self.envelope("a@plain.test")
        results = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert results[0].status == DELIVERED
        assert len(peer.messages) == 1

    @defer.inlineCallbacks
    def test_dns_verdicts(self):
        agent = self.agent()
        for domain, status, code, enhanced in (
            ("nullmx.test", FAILED, 556, "5.1.10"),
            ("nowhere.test", FAILED, 550, "5.1.2"),
            ("broken.test", DEFERRED, 451, "4.4.3"),
            ("self.test", FAILED, 554, "5.4.6"),
        ):
            env, rcpts = self.envelope(f"a@{domain}")
            [result] = yield agent.deliver(env, rcpts, b"x\r\n")
            assert (result.status, result.code, result.enhanced) == (status, code, enhanced), domain

    @defer.inlineCallbacks
    def test_mixed_per_recipient_results_in_one_transaction(self):
        peer = self.peer("127.0.0.2", answers={
            "bad@remote.test": Reply(550, "5.1.1", "no such user"),
            "later@remote.test": Reply(450, "4.2.1", "mailbox busy"),
        })  # fmt: skip
        env, rcpts = self.envelope("ok@remote.test", "bad@remote.test", "later@remote.test")
        results = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert [(r.status, r.enhanced) for r in results] == [(DELIVERED, "2.0.0"), (FAILED, "5.1.1"), (DEFERRED, "4.2.1")]
        assert peer.messages[0][1] == ["ok@remote.test"]

    @defer.inlineCallbacks
    def test_data_refusal_applies_to_the_accepted_recipients(self):
        self.peer("127.0.0.2", answers={"data": Reply(554, "5.7.1", "spam")})
        env, rcpts = self.envelope("a@remote.test")
        [result] = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert (result.status, result.code, result.text) == (FAILED, 554, "spam")

    @defer.inlineCallbacks
    def test_without_pipelining_and_with_helo_fallback(self):
        peer = self.peer("127.0.0.2", disabled={"EHLO"})
        env, rcpts = self.envelope("a@remote.test", "b@remote.test")
        results = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert [r.status for r in results] == [DELIVERED, DELIVERED]
        assert b"HELO client.example.test" in peer.raw
        other = self.peer("127.0.0.3", disabled={"PIPELINING"})
        env, rcpts = self.envelope("a@plain.test")
        results = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert results[0].status == DELIVERED
        # Without PIPELINING the client waits for each reply: no read holds two commands.
        commands = (b"MAIL FROM:", b"RCPT TO:", b"DATA\r\n")
        per_read = [sum(chunk.count(c) for c in commands) for chunk in other.chunks]
        assert sum(per_read) == 3, other.chunks
        assert max(per_read) == 1, other.chunks

    @defer.inlineCallbacks
    def test_several_messages_share_one_connection(self):
        peer = self.peer("127.0.0.2")
        agent = self.agent()
        for _ in range(3):
            env, rcpts = self.envelope("a@remote.test")
            yield agent.deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert len(peer.messages) == 3
        assert peer.connections == 1

    @defer.inlineCallbacks
    def test_recipients_split_over_transactions(self):
        peer = self.peer("127.0.0.2")
        env, rcpts = self.envelope(*[f"r{i}@remote.test" for i in range(5)])
        results = yield self.agent(max_recipients_per_transaction=2).deliver(env, rcpts, b"x\r\n")
        assert all(r.status == DELIVERED for r in results)
        assert [len(m[1]) for m in peer.messages] == [2, 2, 1]

    @defer.inlineCallbacks
    def test_connection_dropped_after_the_final_dot_is_a_deferral(self):
        peer = self.peer("127.0.0.2")
        peer.drop_after_data = True
        env, rcpts = self.envelope("a@remote.test")
        [result] = yield self.agent().deliver(env, rcpts, b"Subject: x\r\n\r\nx\r\n")
        assert (result.status, result.enhanced) == (DEFERRED, "4.4.2")

    @defer.inlineCallbacks
    def test_dsn_parameters_are_passed_on_and_success_without_dsn_is_relayed(self):
        peer = self.peer("127.0.0.2")
        env, rcpts = self.envelope("a@remote.test", ret="HDRS", envid="id+1")
        rcpts[0].notify = ("SUCCESS", "FAILURE")
        rcpts[0].orcpt = "rfc822;a@remote.test"
        yield self.agent().deliver(env, rcpts, b"x\r\n")
        assert b"RET=HDRS ENVID=id+2B1" in peer.raw
        assert b"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@remote.test" in peer.raw
        no_dsn = self.peer("127.0.0.3", disabled={"DSN"})
        env, rcpts = self.envelope("a@plain.test")
        rcpts[0].notify = ("SUCCESS",)
        [result] = yield self.agent().deliver(env, rcpts, b"x\r\n")
        assert result.status == RELAYED
        assert b"NOTIFY" not in no_dsn.raw

    @defer.inlineCallbacks
    def test_8bit_and_smtputf8_need_the_extensions(self):
        self.peer("127.0.0.2", disabled={"8BITMIME", "SMTPUTF8"})
        env, rcpts = self.envelope("a@remote.test")
        [result] = yield self.agent().deliver(env, rcpts, "Subject: é\r\n\r\nü\r\n".encode())
        assert (result.status, result.enhanced) == (FAILED, "5.6.3")
        env, rcpts = self.envelope("a@remote.test", sender="jörg@example.test", smtputf8=True)
        [result] = yield self.agent().deliver(env, rcpts, b"x\r\n")
        assert (result.status, result.enhanced) == (FAILED, "5.6.7")

    @defer.inlineCallbacks
    def test_pushback_pauses_the_destination_and_holds_later_mail(self):
        from pymta.outbound.shaping import Limits, Shaper

        peer = self.peer("127.0.0.2", answers={"a@remote.test": Reply(450, "4.7.28", "rate limit exceeded")})
        shaper = Shaper(reactor, Limits(connections=5))  # the agent's own clock
        agent = self.agent(shaper=shaper)
        env, rcpts = self.envelope("a@remote.test")
        [first] = yield agent.deliver(env, rcpts, b"x\r\n")
        assert first.status == DEFERRED
        assert first.enhanced == "4.7.28"
        connections = peer.connections
        env, rcpts = self.envelope("b@remote.test")
        [held] = yield agent.deliver(env, rcpts, b"x\r\n")
        assert held.status == DEFERRED
        assert held.extra["shaping"] == "mx:mx1.remote.test,mx2.remote.test"
        assert held.extra["hold_until"] >= reactor.seconds() + 590  # the shipped rule pauses 10 minutes
        assert "4.7.28" in held.text
        assert peer.connections == connections

    @defer.inlineCallbacks
    def test_results_name_the_provider_their_destination_rolls_up_to(self):
        from pymta.outbound.shaping import Limits, Shaper

        self.peer("127.0.0.2")
        shaper = Shaper(reactor, Limits(connections=5), providers={"remotemail": (("remote.test",), Limits())})
        [result] = yield self.agent(shaper=shaper).deliver(*self.envelope("a@remote.test"), b"x\r\n")
        assert result.status == DELIVERED
        assert result.extra["provider"] == "remotemail"

    @defer.inlineCallbacks
    def test_source_address_binds_outgoing_connections(self):
        peer = self.peer("127.0.0.2")
        seen = []
        original = peer.factory.delegate.connected
        peer.factory.delegate.connected = lambda session: (seen.append(session.peer_address), original(session))[1]
        env, rcpts = self.envelope("a@remote.test")
        [result] = yield self.agent(source_address="127.0.0.9").deliver(env, rcpts, b"x\r\n")
        assert result.status == DELIVERED
        assert seen == ["127.0.0.9"]

    @defer.inlineCallbacks
    def test_pool_sources_bind_their_address_and_ehlo_name_and_unbindable_ones_leave(self):
        from pymta.outbound.pools import Pool, Source, SourceSelector

        peer = self.peer("127.0.0.2")
        seen = []
        original = peer.factory.delegate.helo
        peer.factory.delegate.helo = lambda session, name: (seen.append((session.peer_address, name)), original(session, name))[1]
        good = Source("good", "127.0.0.9", "mta9.example.test")
        bad = Source("bad", "192.0.2.77", "gone.example.test")  # not an address of this host
        selector = SourceSelector(reactor, {"p": Pool("p", [(bad, 1000), (good, 1)])}, default_pool="p",
                                  rng=random.Random(1))  # fmt: skip
        agent = self.agent(selector=selector)
        env, rcpts = self.envelope("a@remote.test")
        [first] = yield agent.deliver(env, rcpts, b"x\r\n")
        assert not bad.usable
        assert "cannot bind 192.0.2.77" in bad.why_unusable
        env, rcpts = self.envelope("b@remote.test")
        [second] = yield agent.deliver(env, rcpts, b"x\r\n")
        assert second.status == DELIVERED
        assert seen[-1] == ("127.0.0.9", "mta9.example.test")
        assert first.status == DEFERRED
        assert "Cannot bind the source address 192.0.2.77" in first.text

    @defer.inlineCallbacks
    def test_per_source_limits_keep_a_state_per_source(self):
        from pymta.outbound.pools import Pool, Source, SourceSelector
        from pymta.outbound.shaping import Limits, Shaper
        from pymta.rate import parse_rate

        peer = self.peer("127.0.0.2")
        shaper = Shaper(reactor, Limits(per_source=True, message_rate=parse_rate("1/min")))
        s1, s2 = Source("s1", "127.0.0.1", "a.test"), Source("s2", "127.0.0.9", "b.test")
        selector = SourceSelector(reactor, {"p": Pool("p", [(s1, 1)]), "q": Pool("q", [(s2, 1)])})
        agent = self.agent(shaper=shaper, selector=selector)
        outcomes = []
        for pool in ("p", "p", "q"):
            env, rcpts = self.envelope("r@remote.test", extra={"pool": pool})
            [result] = yield agent.deliver(env, rcpts, b"x\r\n")
            outcomes.append((result.status, result.extra.get("shaping")))
        # s1's second message is held by s1's own rate; s2 still sends at once.
        held = (DEFERRED, "mx:mx1.remote.test,mx2.remote.test@s1")
        assert outcomes == [(DELIVERED, None), held, (DELIVERED, None)]
        assert len(peer.messages) == 2

    @defer.inlineCallbacks
    def test_connection_caps_queue_the_excess(self):
        peer = self.peer("127.0.0.2")
        agent = self.agent(max_connections=1, max_connections_per_domain=1)
        calls = []
        for _ in range(3):
            env, rcpts = self.envelope("a@remote.test")
            calls.append(agent.deliver(env, rcpts, b"x\r\n"))
        results = yield defer.gatherResults(calls)
        assert all(r[0].status == DELIVERED for r in results)
        assert peer.connections == 1
        assert len(peer.messages) == 3

    @defer.inlineCallbacks
    def _peak_concurrency(self, address: str, domain: str, agent: SMTPDeliveryAgent, burst: int) -> HoldingPeer:
        peer = HoldingPeer(address, self.port, release_at=1)
        self.addCleanup(peer.stop)
        for _ in range(6):  # slow start: each delivery that goes through widens the window by one
            env, rcpts = self.envelope(f"warm@{domain}")
            [result] = yield agent.deliver(env, rcpts, b"x\r\n")
            assert result.status == DELIVERED, result
        peer.peak_held, peer.release_at = 0, burst
        calls = []
        for i in range(burst):
            env, rcpts = self.envelope(f"r{i}@{domain}")
            calls.append(agent.deliver(env, rcpts, b"x\r\n"))
        results = yield defer.gatherResults(calls)
        assert all(r[0].status == DELIVERED for r in results)
        return peer

    @defer.inlineCallbacks
    def test_a_domain_shaped_above_the_default_connection_cap_gets_its_connections(self):
        # [outbound] max_connections_per_domain = 2 is the shaper's default; remote.test is shaped to 5.
        shaper = Shaper(reactor, Limits(connections=2), {"remote.test": Limits(connections=5)})
        agent = self.agent(max_connections_per_domain=2, shaper=shaper)
        peer = yield self._peak_concurrency("127.0.0.2", "remote.test", agent, burst=8)
        assert peer.peak_held == 5  # the shaper's cap for the domain, above the default, and no more
        assert peer.peak_open <= 5

    @defer.inlineCallbacks
    def test_an_unshaped_domain_keeps_the_default_connection_cap(self):
        shaper = Shaper(reactor, Limits(connections=2), {"remote.test": Limits(connections=5)})
        agent = self.agent(max_connections_per_domain=2, shaper=shaper)
        peer = yield self._peak_concurrency("127.0.0.3", "plain.test", agent, burst=5)
        assert peer.peak_held == 2
        assert peer.peak_open <= 2

    @defer.inlineCallbacks
    def test_abort_all_answers_deliveries_in_flight_as_deferred_and_connects_no_more(self):
        peer = self.peer("127.0.0.2", answers={"data": defer.Deferred()})  # never answers the final dot
        agent = self.agent(max_connections_per_domain=1)
        env, rcpts = self.envelope("a@remote.test")
        hanging = agent.deliver(env, rcpts, b"x\r\n")
        env2, rcpts2 = self.envelope("b@remote.test")
        waiting = agent.deliver(env2, rcpts2, b"x\r\n")  # behind the one connection allowed
        yield deadline(lambda: peer.messages, 10)
        assert not hanging.called
        assert not waiting.called
        yield agent.abort_all(settle=0.5)
        # Which of the two took the one connection depends on which route lookup answered first.
        results = {r.address: r for d in (hanging, waiting) for r in d.result}
        [(_, [sent_to], _)] = peer.messages
        first = results.pop(sent_to)
        [second] = results.values()
        assert first.status == DEFERRED
        assert "may be a duplicate" in first.text
        assert second.status == DEFERRED
        assert second.enhanced == "4.3.2"
        yield deadline(lambda: all(p.transport is None or not p.transport.connected for p in peer.protocols), 5)
        env3, rcpts3 = self.envelope("c@remote.test")
        [third] = yield agent.deliver(env3, rcpts3, b"x\r\n")
        assert (third.status, third.enhanced) == (DEFERRED, "4.3.2")
        assert peer.connections == 1


@defer.inlineCallbacks
def deadline(predicate, seconds: float):
    """Poll ``predicate`` on the reactor until true, at most ``seconds``."""
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        yield task.deferLater(reactor, 0.02, lambda: None)


class SinkTests(unittest.TestCase):
    """Postfix's smtp-sink as the remote MX."""

    timeout = 60

    def setUp(self) -> None:
        if not os.path.exists("/usr/sbin/smtp-sink"):
            raise unittest.SkipTest("smtp-sink (Debian postfix) not installed")
        self.dir = tempfile.mkdtemp(prefix="pymta-sink-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port("127.0.0.5")
        self.sink = subprocess.Popen(
            ["/usr/sbin/smtp-sink", "-u", "nobody", "-d", os.path.join(self.dir, "%M."), f"127.0.0.5:{self.port}", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(self._stop_sink)
        os.chmod(self.dir, 0o777)
        self.dns = DNSServer(Zone(ZONE)).start()
        self.addCleanup(self.dns.stop)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        for _ in range(100):
            try:
                import socket

                socket.create_connection(("127.0.0.5", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)

    def _stop_sink(self) -> None:
        self.sink.terminate()
        self.sink.wait(5)

    @defer.inlineCallbacks
    def test_smtp_sink_receives_the_message_byte_correct(self):
        router = Router(Resolver(reactor, self.pool, [self.dns.address], timeout=1.0), smtp_port=self.port)
        agent = SMTPDeliveryAgent(reactor, router, "client.example.test", idle_timeout=0.1)
        self.addCleanup(agent.close_idle)
        body = b"Subject: sink\r\n\r\n.dot line\r\n" + b"y" * 900 + b"\r\nlast\r\n"
        env = Envelope(qid=new_qid(), sender="s@example.test", recipients=[Recipient("a@sink.test")])
        [result] = yield agent.deliver(env, env.recipients, body)
        assert result.status == DELIVERED, result
        def dumped_whole() -> bool:  # smtp-sink writes its dump file as the session ends
            names = os.listdir(self.dir)
            if len(names) != 1:
                return False
            with open(os.path.join(self.dir, names[0]), "rb") as f:
                return b"last" in f.read()

        yield deadline(dumped_whole, 10)
        dumps = [os.path.join(self.dir, f) for f in os.listdir(self.dir)]
        assert len(dumps) == 1
        with open(dumps[0], "rb") as f:
            dumped = f.read()
        assert body in dumped or body.replace(b"\r\n", b"\n") in dumped


def test_encode_data_normalises_and_stuffs():
    assert encode_data(b".a\nb\r.c\r\n..d") == b"..a\r\nb\r\n..c\r\n...d\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"


class ClientTimeoutTests(unittest.TestCase):
    """Per-stage client timeouts on task.Clock, with an in-memory transport."""

    def test_a_silent_server_times_out_and_the_connection_is_aborted(self):
        from twisted.internet.testing import StringTransport

        from pymta.smtp.client import ReplyTimeout, SMTPClientProtocol

        clock = task.Clock()
        proto = SMTPClientProtocol(clock)
        transport = StringTransport()
        proto.makeConnection(transport)
        failures = []
        proto.expect(300).addErrback(failures.append)
        clock.advance(299)
        assert failures == []
        clock.advance(2)
        assert failures
        assert failures[0].check(ReplyTimeout)
        assert transport.disconnecting or getattr(transport, "aborting", False) or transport.disconnected

    def test_replies_parse_multiline_and_garbage_is_a_protocol_error(self):
        from twisted.internet.testing import StringTransport

        from pymta.smtp.client import SMTPClientProtocol, SMTPProtocolError

        proto = SMTPClientProtocol(task.Clock())
        proto.makeConnection(StringTransport())
        got = []
        proto.expect(10).addCallback(got.append)
        proto.dataReceived(b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
        assert got[0].code == 250
        assert got[0].lines() == ["mx.example", "PIPELINING", "SIZE 1000"]
        errors = []
        proto.expect(10).addErrback(errors.append)
        proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        assert errors
        assert errors[0].check(SMTPProtocolError)


class OutboundTLSTests(unittest.TestCase):
    """STARTTLS to real peers: verified, refused on a bad certificate, opportunistic fallback."""

    timeout = 60

    def setUp(self) -> None:
        from tests.test_e2e_tls import make_cert

        self.dir = tempfile.mkdtemp(prefix="pymta-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port("127.0.0.2")
        self.dns = DNSServer(Zone(ZONE)).start()
        self.addCleanup(self.dns.stop)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.cert, self.key = make_cert(self.dir, name="mx1.remote.test")
        self.router = Router(Resolver(reactor, self.pool, [self.dns.address], timeout=1.0), smtp_port=self.port)

    def peer(self, tls) -> Peer:
        p = Peer("127.0.0.2")
        p.factory.tls_context_factory = tls
        p.listen(self.port)
        self.addCleanup(p.stop)
        return p

    def agent(self, policy: str, ca_file: str | None) -> SMTPDeliveryAgent:
        from pymta.tls import client_tls

        a = SMTPDeliveryAgent(reactor, self.router, "client.example.test", idle_timeout=0.1,
                              timeouts=ClientTimeouts(connect=2, greeting=5, ehlo=5, starttls=5),
                              tls_policy_for=lambda d: policy,
                              tls_context_for=lambda host, verify: client_tls(host, verify, ca_file))  # fmt: skip
        self.addCleanup(a.close_idle)
        return a

    @defer.inlineCallbacks
    def test_verify_against_a_good_certificate_records_tls(self):
        from pymta.tls import ServerTLS

        peer = self.peer(ServerTLS(self.cert, self.key))
        env = Envelope(qid=new_qid(), sender="s@example.test", recipients=[Recipient("a@remote.test")])
        [result] = yield self.agent("verify", self.cert).deliver(env, env.recipients, b"x\r\n")
        assert result.status == DELIVERED
        assert result.tls
        assert result.tls.startswith("TLSv1.")
        assert len(peer.messages) == 1

    @defer.inlineCallbacks
    def test_verify_against_an_unknown_certificate_defers_and_never_sends_in_plaintext(self):
        from pymta.tls import ServerTLS
        from tests.test_e2e_tls import make_cert

        other_dir = tempfile.mkdtemp(prefix="pymta-tls-other-")
        self.addCleanup(shutil.rmtree, other_dir, True)
        other_cert, _ = make_cert(other_dir, name="mx1.remote.test", serial=9)
        peer = self.peer(ServerTLS(self.cert, self.key))
        env = Envelope(qid=new_qid(), sender="s@example.test", recipients=[Recipient("a@remote.test")])
        [result] = yield self.agent("verify", other_cert).deliver(env, env.recipients, b"x\r\n")
        assert result.status == DEFERRED
        assert result.enhanced.startswith("4.")
        assert peer.messages == []
        assert b"MAIL FROM" not in peer.raw

    @defer.inlineCallbacks
    def test_opportunistic_tls_falls_back_to_plaintext_when_the_handshake_fails(self):
        class Broken:
            def getContext(self):
                raise RuntimeError("no certificate here")

        peer = self.peer(Broken())
        env = Envelope(qid=new_qid(), sender="s@example.test", recipients=[Recipient("a@remote.test")])
        agent = self.agent("opportunistic", None)
        [result] = yield agent.deliver(env, env.recipients, b"x\r\n")
        assert result.status == DELIVERED
        assert result.tls is None
        assert len(peer.messages) == 1
        assert "127.0.0.2" in agent.no_tls_until
        self.flushLoggedErrors()

