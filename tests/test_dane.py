"""DANE (RFC 7672) and REQUIRETLS (RFC 8689) on delivery, against real signed DNS on loopback:
knot signs the zones, a validating unbound answers pymta's resolver with the AD bit, and pymta's
own server plays the receiving MX with certificates from a CA the test makes. A STARTTLS-stripping
proxy stands in for an attacker on the path."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from twisted.internet import defer, reactor, ssl
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from pymta.dns import Resolver
from pymta.envelope import DEFERRED, DELIVERED, Envelope, Recipient, new_qid
from pymta.outbound.dane import DANE, DANEHost, check_chain, usable
from pymta.outbound.delivery import SMTPDeliveryAgent
from pymta.outbound.routes import Router
from pymta.smtp.client import ClientTimeouts
from pymta.tls import client_tls
from tests import dnssec
from tests.fakes import Sessions
from tests.mitm import StrippingProxy
from tests.mta_process import free_port
from tests.pki import make_ca, server_options
from tests.test_delivery import Peer

pytestmark = pytest.mark.skipif(dnssec.available() is not None, reason=str(dnssec.available()))

BODY = b"Subject: x\r\n\r\nx\r\n"


def chain_options(cert_path: str, key_path: str, ca_path: str) -> ssl.CertificateOptions:
    """Server TLS that sends the leaf and the CA certificate (what DANE-TA needs to see)."""
    with open(cert_path, "rb") as c, open(key_path, "rb") as k, open(ca_path, "rb") as a:
        leaf = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        ca = ssl.Certificate.loadPEM(a.read())
    return ssl.CertificateOptions(privateKey=leaf.privateKey.original, certificate=leaf.original,
                                  extraCertChain=[ca.original])  # fmt: skip


class DANETests(unittest.TestCase):
    timeout = 90

    @classmethod
    def setUpClass(cls) -> None:
        cls.dir = tempfile.mkdtemp(prefix="pymta-dane-")
        cls.ca = make_ca(cls.dir)
        cls.stranger = make_ca(tempfile.mkdtemp(dir=cls.dir), name="someone else")
        cls.good = cls.stranger.issue("not-the-mx.example")  # DANE-EE: names and issuers do not matter
        cls.valid_other = cls.ca.issue("mx.wrong.dane.test")  # PKIX-valid, but not the TLSA key
        cls.plain_cert = cls.ca.issue("mx.plain.test")
        good = dnssec.tlsa_for(cls.good[0])
        ca_digest = dnssec.tlsa_for(cls.ca.cert_path, usage=2, selector=0, mtype=1)
        zones = {
            "dane.test": "\n".join([
                "ee MX 10 mx.ee", "mx.ee A 127.0.0.2", f"_25._tcp.mx.ee TLSA {good}",
                "wrong MX 10 mx.wrong", "mx.wrong A 127.0.0.3", f"_25._tcp.mx.wrong TLSA {good}",
                "ta MX 10 mx.ta", "mx.ta A 127.0.0.4", f"_25._tcp.mx.ta TLSA {ca_digest}",
                "unusable MX 10 mx.unusable", "mx.unusable A 127.0.0.5",
                f"_25._tcp.mx.unusable TLSA 1 1 1 {'ab' * 32}", f"_25._tcp.mx.unusable TLSA 3 1 9 {'cd' * 32}",
                "tb MX 10 mx.tb", "mx.tb A 127.0.0.6", "_25._tcp.mx.tb CNAME _25._tcp.mx.bogus.test.",
                "mitm MX 10 mx.mitm", "mx.mitm A 127.0.0.7", f"_25._tcp.mx.mitm TLSA {good}",
            ]),
            "bogus.test": f"mx A 127.0.0.8\n_25._tcp.mx TLSA {good}",
            "plain.test": f"@ MX 10 mx\nmx A 127.0.0.9\n_25._tcp.mx TLSA {good}\nmitm MX 10 mx.mitm\nmx.mitm A 127.0.0.10",
        }  # fmt: skip
        cls.dns = dnssec.SignedDNS(cls.dir, zones, bogus=("bogus.test",), unsigned=("plain.test",)).start()
        cls.port = free_port("127.0.0.2")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dns.stop()
        shutil.rmtree(cls.dir, True)

    def setUp(self) -> None:
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.resolver = Resolver(reactor, self.pool, [self.dns.address], timeout=2.0, dnssec=True)
        self.router = Router(self.resolver, smtp_port=self.port)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def peer(self, address: str, options=None, disabled=frozenset()) -> Peer:
        p = Peer(address, disabled=disabled)
        p.factory.tls_context_factory = options
        p.listen(self.port)
        self.addCleanup(p.stop)
        return p

    def agent(self, dane: bool = True) -> SMTPDeliveryAgent:
        a = SMTPDeliveryAgent(reactor, self.router, "client.test", idle_timeout=0.1,
                              dane=DANE(self.resolver) if dane else None,
                              timeouts=ClientTimeouts(connect=2, greeting=5, ehlo=5, starttls=5),
                              tls_context_for=lambda host, verify: client_tls(host, verify, self.ca.cert_path))  # fmt: skip
        self.addCleanup(a.close_idle)
        return a

    @defer.inlineCallbacks
    def send(self, agent: SMTPDeliveryAgent, domain: str, body: bytes = BODY, **extra):
        env = Envelope(qid=new_qid(), sender="s@a.test", recipients=[Recipient(f"r@{domain}")], extra=extra)
        [result] = yield agent.deliver(env, env.recipients, body)
        return result

    def logged(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    # DANE-EE and DANE-TA --------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_dane_ee_match_delivers_whatever_the_name_or_issuer(self):
        peer = self.peer("127.0.0.2", server_options(*self.good))
        agent = self.agent()
        agent.tls_reports = Sessions()
        result = yield self.send(agent, "ee.dane.test")
        assert result.status == DELIVERED
        assert result.tls
        assert result.extra["tls_policy"] == "dane"
        assert len(peer.messages) == 1
        assert [(s[0], s[1], s[5]) for s in agent.tls_reports.seen] == [("ee.dane.test", "tlsa", None)]  # a success
        assert peer.protocols[0].transport.getHandle().get_servername() == b"mx.ee.dane.test"  # SNI, RFC 7672 §8.1

    @defer.inlineCallbacks
    def test_a_certificate_matching_no_tlsa_record_is_refused_even_if_pkix_valid(self):
        peer = self.peer("127.0.0.3", server_options(*self.valid_other))
        agent = self.agent()
        agent.tls_reports = Sessions()
        result = yield self.send(agent, "wrong.dane.test")
        assert (result.status, result.code, result.enhanced) == (DEFERRED, 451, "4.7.5"), result
        assert "matches no TLSA record" in result.text
        assert "DANE" in result.text
        assert peer.messages == []
        assert b"MAIL FROM" not in peer.raw
        assert self.logged("dane_mismatch")[0]["result_type"] == "validation-failure"
        [(domain, policy_type, strings, mx, ip, outcome)] = agent.tls_reports.seen  # counted for TLS reports
        assert (domain, policy_type, mx, ip, outcome) == ("wrong.dane.test", "tlsa", "mx.wrong.dane.test", "127.0.0.3",
                                                          "validation-failure")  # fmt: skip
        assert strings == [dnssec.tlsa_for(self.good[0])]

    @defer.inlineCallbacks
    def test_dane_never_falls_back_to_plaintext(self):
        peer = self.peer("127.0.0.2", None)  # no STARTTLS offered
        result = yield self.send(self.agent(), "ee.dane.test")
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert "TLS" in result.text
        assert peer.messages == []
        assert b"MAIL FROM" not in peer.raw
        # Without DANE the same host takes the mail in plaintext: the TLSA records made the difference.
        plain = yield self.send(self.agent(dane=False), "ee.dane.test")
        assert plain.status == DELIVERED
        assert plain.tls is None

    @defer.inlineCallbacks
    def test_dane_ta_needs_the_chain_to_the_anchor_and_the_mx_name(self):
        cert, key = self.ca.issue("mx.ta.dane.test")
        peer = self.peer("127.0.0.4", chain_options(cert, key, self.ca.cert_path))
        result = yield self.send(self.agent(), "ta.dane.test")
        assert result.status == DELIVERED
        assert result.extra["tls_policy"] == "dane"
        assert len(peer.messages) == 1
        yield peer.stop()
        cert, key = self.ca.issue("elsewhere.dane.test")
        peer = self.peer("127.0.0.4", chain_options(cert, key, self.ca.cert_path))
        result = yield self.send(self.agent(), "ta.dane.test")
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert "certificate-host-mismatch" in result.text
        assert peer.messages == []

    # unusable, bogus, insecure ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_tlsa_records_with_unusable_parameters_make_tls_mandatory_but_unauthenticated(self):
        peer = self.peer("127.0.0.5", server_options(*self.stranger.issue("anything.example")))
        result = yield self.send(self.agent(), "unusable.dane.test")
        assert result.status == DELIVERED
        assert result.tls
        assert len(peer.messages) == 1
        assert self.logged("dane_tlsa_unusable")[0]["n"] == 2
        yield peer.stop()
        bare = self.peer("127.0.0.5", None)
        refused = yield self.send(self.agent(), "unusable.dane.test")
        assert (refused.status, refused.enhanced) == (DEFERRED, "4.7.5")
        assert bare.messages == []

    @defer.inlineCallbacks
    def test_a_bogus_tlsa_answer_defers_the_host_and_never_connects(self):
        peer = self.peer("127.0.0.6", None)
        result = yield self.send(self.agent(), "tb.dane.test")
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert "TLSA lookup" in result.text
        assert peer.connections == 0
        assert self.logged("dane_tlsa_failed")

    @defer.inlineCallbacks
    def test_tlsa_records_in_an_unsigned_zone_mean_no_dane(self):
        peer = self.peer("127.0.0.9", None)
        result = yield self.send(self.agent(), "plain.test")
        assert result.status == DELIVERED
        assert result.tls is None
        assert result.extra["tls_policy"] == "opportunistic"
        assert len(peer.messages) == 1

    @defer.inlineCallbacks
    def test_dane_precedes_an_mta_sts_policy_of_the_same_domain(self):
        from pymta.outbound.tlspolicy import CachedPolicy, STSPolicy

        class EnforceElsewhere:  # an enforce policy no MX of the domain matches
            def policy_for(self, domain):
                return defer.succeed(CachedPolicy(domain, "x", STSPolicy("enforce", ("other.test",), 600), 0.0))

        peer = self.peer("127.0.0.2", server_options(*self.good))
        agent = self.agent()
        agent.mta_sts = EnforceElsewhere()
        result = yield self.send(agent, "ee.dane.test")
        assert result.status == DELIVERED
        assert result.extra["tls_policy"] == "dane"
        assert len(peer.messages) == 1
        agent.dane = None  # without DANE the MTA-STS policy would have stopped it
        refused = yield self.send(agent, "ee.dane.test")
        assert (refused.status, refused.enhanced, refused.extra["tls_policy"]) == (DEFERRED, "4.7.5", "mta-sts")

    # a STARTTLS-stripping attacker ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_starttls_stripping_proxy_gets_no_mail_under_dane(self):
        backend = self.peer("127.0.0.11", server_options(*self.good))
        proxy = StrippingProxy("127.0.0.7", self.port, ("127.0.0.11", self.port))
        self.addCleanup(proxy.stop)
        result = yield self.send(self.agent(), "mitm.dane.test")
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5"), result
        assert proxy.stripped >= 1
        assert b"MAIL FROM" not in proxy.client_bytes
        assert backend.messages == []

    # REQUIRETLS --------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_requiretls_goes_over_dane_to_a_hop_that_offers_it_and_is_passed_on(self):
        peer = self.peer("127.0.0.2", server_options(*self.good))
        result = yield self.send(self.agent(), "ee.dane.test", requiretls=True)
        assert result.status == DELIVERED
        assert result.extra["tls_policy"] == "requiretls"
        assert b"REQUIRETLS" in peer.raw.split(b"MAIL FROM")[1].split(b"\r\n")[0]

    @defer.inlineCallbacks
    def test_requiretls_waits_for_a_hop_without_requiretls(self):
        peer = self.peer("127.0.0.2", server_options(*self.good), disabled={"REQUIRETLS"})
        result = yield self.send(self.agent(), "ee.dane.test", requiretls=True)
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.30")
        assert peer.messages == []
        assert b"MAIL FROM" not in peer.raw

    @defer.inlineCallbacks
    def test_requiretls_without_dane_needs_a_pkix_certificate_for_the_mx_name(self):
        peer = self.peer("127.0.0.9", server_options(*self.plain_cert))
        result = yield self.send(self.agent(), "plain.test", requiretls=True)
        assert result.status == DELIVERED
        assert result.extra["tls_policy"] == "requiretls"
        assert len(peer.messages) == 1
        yield peer.stop()
        peer = self.peer("127.0.0.9", server_options(*self.stranger.issue("mx.plain.test")))
        result = yield self.send(self.agent(), "plain.test", requiretls=True)
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert peer.messages == []

    @defer.inlineCallbacks
    def test_a_starttls_stripping_proxy_gets_no_requiretls_mail(self):
        backend = self.peer("127.0.0.12", server_options(*self.ca.issue("mx.mitm.plain.test")))
        proxy = StrippingProxy("127.0.0.10", self.port, ("127.0.0.12", self.port))
        self.addCleanup(proxy.stop)
        result = yield self.send(self.agent(), "mitm.plain.test", requiretls=True)
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5"), result
        assert proxy.stripped >= 1
        assert b"MAIL FROM" not in proxy.client_bytes
        assert backend.messages == []

    @defer.inlineCallbacks
    def test_tls_required_no_delivers_opportunistically_where_dane_would_refuse(self):
        peer = self.peer("127.0.0.3", server_options(*self.valid_other))
        body = b"Subject: x\r\nTLS-Required: No\r\n\r\nx\r\n"
        result = yield self.send(self.agent(), "wrong.dane.test", body=body)
        assert result.status == DELIVERED
        assert result.extra["tls_policy"] == "opportunistic"
        assert b"TLS-Required: No" in peer.messages[0][2]  # the header stays in the message
        assert self.logged("tls_required_no")


# -- the matching rules without the network -----------------------------------------------------


def test_only_usages_2_3_selectors_0_1_and_matching_0_1_2_are_usable():
    records = ((3, 1, 1, b"a"), (2, 0, 2, b"b"), (1, 1, 1, b"c"), (0, 0, 1, b"d"), (3, 2, 1, b"e"), (3, 1, 3, b"f"))
    assert usable(records) == ((3, 1, 1, b"a"), (2, 0, 2, b"b"))


def test_a_session_without_a_certificate_chain_matches_nothing():
    class NoHandle:
        def getHandle(self):
            return None

    assert check_chain(NoHandle(), DANEHost("mx.test", ((3, 1, 1, b"x"),)), ("mx.test",)).startswith("validation-failure")
    assert check_chain(NoHandle(), DANEHost("mx.test", ()), ("mx.test",)) is None  # no usable record: unauthenticated
