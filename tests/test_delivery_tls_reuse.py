"""Connection reuse never weakens a TLS policy: an idle connection is pooled under the policy it
was opened with and the name its certificate was verified for, and mail takes it only when that
satisfies the mail's own policy. Real TLS on loopback with certificates the test makes."""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pymta.envelope import DEFERRED, DELIVERED, Envelope, Recipient, new_qid
from pymta.outbound.delivery import SMTPDeliveryAgent
from pymta.smtp.client import ClientTimeouts
from pymta.tls import ServerTLS, client_tls
from tests.dnsserver import loopback_router
from tests.mta_process import free_port
from tests.test_delivery import Peer
from tests.test_e2e_tls import make_cert

# Three domains, one mail exchanger: what one domain's mail leaves idle, the next may find.
ZONE = {
    "opp.test": {"MX": ["10 mx.shared.test."]},
    "ver.test": {"MX": ["10 mx.shared.test."]},
    "plain.test": {"MX": ["10 mx.shared.test."]},
    "alias.test": {"MX": ["10 other-name.shared.test."]},
    "mx.shared.test": {"A": ["127.0.0.2"]},
    "other-name.shared.test": {"A": ["127.0.0.2"]},
}
POLICIES = {"opp.test": "opportunistic", "ver.test": "verify", "plain.test": "none", "alias.test": "verify"}


class ReuseWorld:
    """One loopback mail exchanger for the domains above, and an agent that delivers to it."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pymta-reuse-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cert, self.key = make_cert(self.dir, name="mx.shared.test")
        self.port = free_port("127.0.0.2")
        self.router = loopback_router(self, ZONE, self.port)

    def peer(self, tls: bool = True) -> Peer:
        p = Peer("127.0.0.2")
        if tls:
            p.factory.tls_context_factory = ServerTLS(self.cert, self.key)
        p.seen = []  # (recipient domain, the TLS state of the session the message came in on)
        original = p.factory.delegate.message

        def message(session, body):
            for r in session.transaction.recipients:
                p.seen.append((r.address.rpartition("@")[2], session.tls))
            return original(session, body)

        p.factory.delegate.message = message
        p.listen(self.port)
        self.addCleanup(p.stop)
        return p

    def agent(self, ca_file: str) -> SMTPDeliveryAgent:
        a = SMTPDeliveryAgent(reactor, self.router, "client.test", idle_timeout=30,
                              timeouts=ClientTimeouts(connect=2, greeting=5, ehlo=5, starttls=5),
                              tls_policy_for=POLICIES.__getitem__,
                              tls_context_for=lambda host, verify: client_tls(host, verify, ca_file))  # fmt: skip
        self.addCleanup(a.close_idle)
        return a

    @defer.inlineCallbacks
    def send(self, agent: SMTPDeliveryAgent, domain: str):
        env = Envelope(qid=new_qid(), sender="s@a.test", recipients=[Recipient(f"r@{domain}")])
        [result] = yield agent.deliver(env, env.recipients, b"Subject: x\r\n\r\nx\r\n")
        return result

    def untrusted_ca(self) -> str:
        other = tempfile.mkdtemp(prefix="pymta-reuse-other-")
        self.addCleanup(shutil.rmtree, other, True)
        return make_cert(other, name="mx.shared.test", serial=7)[0]



class TLSReuseTests(ReuseWorld, unittest.TestCase):
    @defer.inlineCallbacks
    def test_verify_mail_never_takes_the_unverified_session_opportunistic_mail_left_idle(self):
        peer = self.peer()
        agent = self.agent(self.untrusted_ca())  # the server's certificate cannot be verified
        first = yield self.send(agent, "opp.test")
        assert first.status == DELIVERED
        assert first.tls
        second = yield self.send(agent, "ver.test")
        assert second.status == DEFERRED
        assert second.enhanced.startswith("4.7.")
        assert peer.connections == 2  # a connection of its own, refused at the handshake
        assert [d for d, _ in peer.seen] == ["opp.test"]

    @defer.inlineCallbacks
    def test_verify_mail_never_takes_a_plaintext_session(self):
        peer = self.peer(tls=False)  # no STARTTLS at all
        agent = self.agent(self.cert)
        first = yield self.send(agent, "opp.test")
        assert first.status == DELIVERED
        assert first.tls is None
        second = yield self.send(agent, "ver.test")
        assert (second.status, second.enhanced) == (DEFERRED, "4.7.4")
        assert peer.connections == 2
        assert [d for d, _ in peer.seen] == ["opp.test"]
        assert peer.raw.count(b"MAIL FROM") == 1

    @defer.inlineCallbacks
    def test_a_verified_session_is_reused_for_its_name_only_and_serves_weaker_policies(self):
        peer = self.peer()
        agent = self.agent(self.cert)
        for domain in ("opp.test", "ver.test", "ver.test", "opp.test", "plain.test"):
            result = yield self.send(agent, domain)
            assert result.status == DELIVERED, domain
            assert result.tls, domain
        # opp.test's unverified session stays idle; ver.test opened a verified one, reused by all after.
        assert peer.connections == 2
        assert all(tls for _, tls in peer.seen)
        # Same address, other MX name: the certificate was verified for mx.shared.test, not for it.
        alias = yield self.send(agent, "alias.test")
        assert alias.status == DEFERRED
        assert peer.connections == 3
        assert [d for d, _ in peer.seen].count("alias.test") == 0

    @defer.inlineCallbacks
    def test_opportunistic_mail_does_not_take_a_plaintext_session_opened_for_a_none_policy(self):
        peer = self.peer()
        agent = self.agent(self.cert)
        first = yield self.send(agent, "plain.test")
        assert first.status == DELIVERED
        assert first.tls is None
        second = yield self.send(agent, "opp.test")
        assert second.status == DELIVERED
        assert second.tls
        assert peer.connections == 2
        assert peer.seen == [("plain.test", None), ("opp.test", peer.seen[1][1])]
        assert peer.seen[1][1]


class ReuseLogTests(ReuseWorld, unittest.TestCase):
    """The per-delivery "reusing" detail line exists only with ``[log] debug = true``."""

    def reuse_lines(self) -> list[dict]:
        from twisted.logger import globalLogPublisher

        seen: list[dict] = []

        def observe(event: dict) -> None:
            if str(event.get("log_format", "")).startswith("reusing "):
                seen.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    @defer.inlineCallbacks
    def test_a_reused_connection_is_logged_only_when_debug_is_asked_for(self):
        from pymta.log import set_debug

        self.addCleanup(set_debug, False)
        peer = self.peer(tls=False)
        agent = self.agent(self.cert)
        lines = self.reuse_lines()
        for on in (False, True):
            set_debug(on)
            for _ in range(2):
                assert (yield self.send(agent, "plain.test")).status == DELIVERED
        assert peer.connections == 1  # all four over one connection: three reuses
        assert [e["mx"] for e in lines] == ["mx.shared.test"] * 2  # only the two made with debug on
