"""An IP literal given as an MX name is left out on purpose (RFC 5321 §5.1), with a log record,
even where the literal happens to resolve: real DNS and SMTP peers on loopback."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pymta.dns import ip_literal
from pymta.envelope import DELIVERED, Envelope, Recipient, new_qid
from pymta.outbound.delivery import SMTPDeliveryAgent
from pymta.outbound.routes import RouteError
from pymta.smtp.client import ClientTimeouts
from tests.dnsserver import loopback_router
from tests.mta_process import free_port
from tests.test_delivery import Peer

ZONE = {
    # The literal is the preferred MX and even has an A record: only an explicit rule skips it.
    "mixed.test": {"MX": ["5 127.0.0.2.", "7 [127.0.0.2].", "10 mx.mixed.test."]},
    "127.0.0.2": {"A": ["127.0.0.2"]},
    "mx.mixed.test": {"A": ["127.0.0.3"]},
    "literal.test": {"MX": ["10 127.0.0.2.", "20 [IPv6:::1]."]},
}


def test_ip_literals_are_recognised_in_every_spelling():
    assert ip_literal("192.0.2.1") == "192.0.2.1"
    assert ip_literal("[192.0.2.1]") == "192.0.2.1"
    assert ip_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert ip_literal("2001:db8::1") == "2001:db8::1"
    assert ip_literal("mx1.example.test") is None
    assert ip_literal("1.2.3.4.example") is None


class MXLiteralTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.port = free_port("127.0.0.2")
        self.router = loopback_router(self, ZONE, self.port)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def literal_records(self) -> list[tuple[str, str]]:
        return [(e["domain"], e["mx"]) for e in self.events if e.get("event") == "mx_ip_literal"]

    @defer.inlineCallbacks
    def test_a_literal_mx_is_skipped_with_a_log_record_and_the_named_host_gets_the_mail(self):
        literal_peer = Peer("127.0.0.2").listen(self.port)
        self.addCleanup(literal_peer.stop)
        named_peer = Peer("127.0.0.3").listen(self.port)
        self.addCleanup(named_peer.stop)
        hops = yield self.router.next_hops("mixed.test")
        assert [h.name for h in hops] == ["mx.mixed.test"]
        assert sorted(self.literal_records()) == [("mixed.test", "127.0.0.2"), ("mixed.test", "[127.0.0.2]")]
        assert next(e for e in self.events if e.get("event") == "mx_ip_literal")["log_level"].name == "warn"
        agent = SMTPDeliveryAgent(reactor, self.router, "client.test", timeouts=ClientTimeouts(connect=2, greeting=5),
                                  idle_timeout=0.1)  # fmt: skip
        self.addCleanup(agent.close_idle)
        env = Envelope(qid=new_qid(), sender="s@a.test", recipients=[Recipient("r@mixed.test")])
        [result] = yield agent.deliver(env, env.recipients, b"Subject: x\r\n\r\nx\r\n")
        assert result.status == DELIVERED
        assert result.remote_mta == "mx.mixed.test [127.0.0.3]"
        assert literal_peer.connections == 0
        assert len(named_peer.messages) == 1

    @defer.inlineCallbacks
    def test_a_domain_whose_mx_are_all_literals_defers_and_says_why(self):
        try:
            yield self.router.next_hops("literal.test")
        except RouteError as e:
            reply = e.reply
        else:
            raise AssertionError("literal MX hosts were used")
        assert (reply.code, reply.enhanced) == (451, "4.4.4")
        assert "IP literals" in reply.text
        assert "127.0.0.2" in reply.text
        assert "[ipv6:::1]" in reply.text
        assert sorted(self.literal_records()) == [("literal.test", "127.0.0.2"), ("literal.test", "[ipv6:::1]")]
