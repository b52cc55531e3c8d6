"""MTA-STS (RFC 8461): the policy announced in DNS, fetched over HTTPS, cached on disk, and what
enforce and testing do to delivery. Real parts on loopback: the DNS server, an HTTPS policy host
and SMTP peers with certificates from a CA the test makes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web import resource, server

from pymta.dns import Resolver
from pymta.envelope import DEFERRED, DELIVERED, Envelope, Recipient, new_qid
from pymta.outbound.delivery import SMTPDeliveryAgent
from pymta.outbound.routes import Router
from pymta.outbound.tlspolicy import MTASTS, PolicyError, STSPolicy, parse_policy, parse_txt
from pymta.smtp.client import ClientTimeouts
from pymta.tls import client_tls
from tests.dnsserver import DNSServer, Zone
from tests.fakes import Sessions
from tests.mta_process import free_port
from tests.pki import make_ca, server_options
from tests.test_delivery import Peer

ENFORCE = b"version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmx: *.backup.sts.test\r\nmax_age: 86400\r\n"


# -- parsing ---------------------------------------------------------------------------------


def test_a_policy_parses_with_crlf_or_lf_and_ignores_unknown_keys():
    policy = parse_policy(ENFORCE)
    assert policy == STSPolicy("enforce", ("mx.sts.test", "*.backup.sts.test"), 86400)
    lf = parse_policy(b"version: STSv1\nmode: testing\nmx: MX.Example.TEST.\nmax_age: 99999999\nfuture_key: x\n")
    assert lf.mode == "testing"
    assert lf.mx == ("mx.example.test",)
    assert lf.max_age == 31557600


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 60\n", "version"),
        (b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 60\n", "mode"),
        (b"version: STSv1\nmode: enforce\nmax_age: 60\n", "needs at least one mx"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 60\n", "not an mx pattern"),
        (b"<html>not a policy</html>\n", "not 'key: value'"),
        (b"version: STSv1\n\xff\xfe\n", "UTF-8"),
    ],
)
def test_a_bad_policy_is_refused_with_the_reason(body, reason):
    with pytest.raises(PolicyError, match=reason):
        parse_policy(body)


def test_the_txt_record_gives_the_id_or_nothing():
    assert parse_txt(["v=STSv1; id=20240101T000000;"]) == "20240101T000000"
    assert parse_txt(["v=STSv1; id=abc123"]) == "abc123"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=X1;ext=1"]) == "X1"
    assert parse_txt(["v=spf1 -all"]) is None
    assert parse_txt([]) is None
    with pytest.raises(PolicyError, match="exactly one"):
        parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"])
    with pytest.raises(PolicyError, match="no valid id"):
        parse_txt(["v=STSv1; id=not-alnum!"])


def test_mx_patterns_match_one_leftmost_label_only():
    policy = STSPolicy("enforce", ("mx.sts.test", "*.backup.sts.test"), 60)
    assert policy.matches("MX.sts.test.")
    assert policy.matches("a.backup.sts.test")
    assert not policy.matches("backup.sts.test")
    assert not policy.matches("a.b.backup.sts.test")
    assert not policy.matches("mx.sts.test.evil.test")
    assert not policy.matches("xmx.sts.test")


# -- the policy host, DNS and SMTP peers on loopback -----------------------------------------


class PolicyResource(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = ENFORCE
        self.status = 200
        self.content_type = b"text/plain"
        self.location: bytes | None = None
        self.requests: list[bytes] = []

    def render_GET(self, request):
        self.requests.append(request.uri)
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.content_type)
        if self.location:
            request.setHeader(b"location", self.location)
        return self.body


class Silent(Protocol):
    def connectionMade(self) -> None:
        self.factory.seen.append(self)


def zone(txt_id: str = "one") -> dict:
    return {
        "sts.test": {"MX": ["10 mx.sts.test."]},
        "_mta-sts.sts.test": {"TXT": [f'"v=STSv1; id={txt_id};"']},
        "mta-sts.sts.test": {"A": ["127.0.0.6"]},
        "mx.sts.test": {"A": ["127.0.0.2"]},
    }


class MTASTSTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pymta-sts-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = make_ca(self.dir)
        self.zone = Zone(zone())
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        self.pool = ThreadPool(1, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dns_clock = task.Clock()  # the resolver's TTL cache: advanced to see a changed zone
        self.dns_clock.advance(reactor.seconds())
        self.resolver = Resolver(reactor, self.pool, [self.dns.address], timeout=1.0, clock=self.dns_clock)
        self.smtp_port = free_port("127.0.0.2")
        self.router = Router(self.resolver, smtp_port=self.smtp_port)
        self.https_port = free_port("127.0.0.6")
        self.policy = PolicyResource()
        https = reactor.listenSSL(self.https_port, server.Site(self.policy),
                                  server_options(*self.ca.issue("mta-sts.sts.test")), interface="127.0.0.6")  # fmt: skip
        self.addCleanup(https.stopListening)
        self.cache_dir = os.path.join(self.dir, "state", "mta-sts")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def sts(self, **kw) -> MTASTS:
        kw.setdefault("ca_file", self.ca.cert_path)
        return MTASTS(reactor, self.resolver, self.cache_dir, https_port=self.https_port, **kw)

    def peer(self, cert_name: str | None = "mx.sts.test", **cert) -> Peer:
        p = Peer("127.0.0.2")
        if cert_name is not None:
            p.factory.tls_context_factory = server_options(*self.ca.issue(cert_name, **cert))
        p.listen(self.smtp_port)
        self.addCleanup(p.stop)
        return p

    def agent(self, sts: MTASTS | None) -> SMTPDeliveryAgent:
        a = SMTPDeliveryAgent(reactor, self.router, "client.test", idle_timeout=0.1, mta_sts=sts,
                              timeouts=ClientTimeouts(connect=2, greeting=5, ehlo=5, starttls=5),
                              tls_context_for=lambda host, verify: client_tls(host, verify, self.ca.cert_path))  # fmt: skip
        self.addCleanup(a.close_idle)
        return a

    @defer.inlineCallbacks
    def send(self, agent: SMTPDeliveryAgent):
        env = Envelope(qid=new_qid(), sender="s@a.test", recipients=[Recipient("r@sts.test")])
        [result] = yield agent.deliver(env, env.recipients, b"Subject: x\r\n\r\nx\r\n")
        return result

    def logged(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    # enforce ---------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_enforce_delivers_over_tls_verified_for_the_mx_name_and_says_so(self):
        peer = self.peer()
        result = yield self.send(self.agent(self.sts()))
        assert result.status == DELIVERED
        assert result.tls
        assert result.extra["tls_policy"] == "mta-sts"
        assert len(peer.messages) == 1
        assert self.policy.requests == [b"/.well-known/mta-sts.txt"]

    @defer.inlineCallbacks
    def test_enforce_never_sends_in_plaintext_to_a_host_without_starttls(self):
        peer = self.peer(cert_name=None)
        result = yield self.send(self.agent(self.sts()))
        assert (result.status, result.code, result.enhanced) == (DEFERRED, 451, "4.7.5")
        assert "MTA-STS" in result.text
        assert b"MAIL FROM" not in peer.raw
        assert peer.messages == []
        # Without MTA-STS the same host gets the mail in plaintext (opportunistic): the policy made the difference.
        plain = yield self.send(self.agent(None))
        assert plain.status == DELIVERED
        assert plain.tls is None

    @defer.inlineCallbacks
    def test_enforce_refuses_a_certificate_for_another_name_or_expired(self):
        for cert in ({"cert_name": "other.sts.test"}, {"cert_name": "mx.sts.test", "expired": True}):
            peer = self.peer(**cert)
            result = yield self.send(self.agent(self.sts()))
            assert (result.status, result.enhanced) == (DEFERRED, "4.7.5"), cert
            assert peer.messages == []
            assert b"MAIL FROM" not in peer.raw
            yield peer.stop()

    @defer.inlineCallbacks
    def test_enforce_with_no_matching_mx_defers_without_connecting(self):
        self.policy.body = ENFORCE.replace(b"mx: mx.sts.test\r\n", b"")
        peer = self.peer()
        result = yield self.send(self.agent(self.sts()))
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert "matches its MTA-STS policy" in result.text
        assert peer.connections == 0
        assert self.logged("mta_sts_mx_mismatch")[0]["skipped"] == ["mx.sts.test"]

    @defer.inlineCallbacks
    def test_enforce_sends_nothing_through_a_starttls_stripping_proxy(self):
        from tests.mitm import StrippingProxy

        backend = Peer("127.0.0.13")
        backend.factory.tls_context_factory = server_options(*self.ca.issue("mx.sts.test"))
        backend.listen(self.smtp_port)
        self.addCleanup(backend.stop)
        proxy = StrippingProxy("127.0.0.2", self.smtp_port, ("127.0.0.13", self.smtp_port))
        self.addCleanup(proxy.stop)
        result = yield self.send(self.agent(self.sts()))
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert "MTA-STS" in result.text
        assert proxy.stripped >= 1
        assert b"MAIL FROM" not in proxy.client_bytes
        assert backend.messages == []

    # testing ---------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_testing_mode_delivers_as_before_and_records_what_failed(self):
        self.policy.body = b"version: STSv1\nmode: testing\nmx: other.sts.test\nmax_age: 600\n"
        peer = self.peer(cert_name=None)
        agent = self.agent(self.sts())
        agent.tls_reports = Sessions()
        result = yield self.send(agent)
        [(domain, policy_type, strings, mx, _, outcome)] = agent.tls_reports.seen  # counted for TLS reports
        assert (domain, policy_type, mx, outcome) == ("sts.test", "sts", "mx.sts.test", "starttls-not-supported")
        assert strings == ["version: STSv1", "mode: testing", "mx: other.sts.test", "max_age: 600"]
        assert result.status == DELIVERED
        assert result.tls is None
        assert result.extra["tls_policy"] == "mta-sts"
        assert len(peer.messages) == 1
        assert result.extra["tls_failure"] == "starttls-not-supported"
        [mismatch] = self.logged("mta_sts_mx_mismatch")
        assert mismatch["mode"] == "testing"
        assert mismatch["domain"] == "sts.test"
        assert self.logged("mta_sts_testing_failure")[0]["result_type"] == "starttls-not-supported"

    @defer.inlineCallbacks
    def test_testing_mode_names_each_certificate_problem_enforce_would_refuse(self):
        self.policy.body = b"version: STSv1\nmode: testing\nmx: mx.sts.test\nmax_age: 600\n"
        stranger = make_ca(tempfile.mkdtemp(dir=self.dir), name="someone else")
        for cert, expected in (
            (self.ca.issue("mx.sts.test"), None),
            (self.ca.issue("other.sts.test"), "certificate-host-mismatch"),
            (self.ca.issue("mx.sts.test", expired=True), "certificate-expired"),
            (stranger.issue("mx.sts.test"), "certificate-not-trusted"),
        ):
            peer = Peer("127.0.0.2")
            peer.factory.tls_context_factory = server_options(*cert)
            peer.listen(self.smtp_port)
            self.addCleanup(peer.stop)
            result = yield self.send(self.agent(self.sts()))
            assert result.status == DELIVERED, cert
            assert result.tls, cert
            assert len(peer.messages) == 1, cert
            assert result.extra.get("tls_failure") == expected, cert
            yield peer.stop()

    # the cache -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_cached_policy_survives_a_restart_and_holds_while_the_host_is_down(self):
        first = yield self.sts().policy_for("sts.test")
        assert first.policy.mode == "enforce"
        assert first.id == "one"
        with open(os.path.join(self.cache_dir, "sts.test.json")) as f:
            assert json.load(f)["policy"]["mx"] == ["mx.sts.test", "*.backup.sts.test"]
        self.policy.status = 500  # the policy host breaks; a new process starts with the same state_dir
        peer = self.peer(cert_name=None)
        result = yield self.send(self.agent(self.sts()))
        assert (result.status, result.enhanced) == (DEFERRED, "4.7.5")
        assert peer.messages == []
        assert len(self.policy.requests) == 1  # same id: the cache is used, nothing fetched

    @defer.inlineCallbacks
    def test_a_new_id_fetches_again_and_a_failed_fetch_keeps_the_unexpired_policy(self):
        sts = self.sts()
        yield sts.policy_for("sts.test")
        self.zone.records["_mta-sts.sts.test."] = zone("two")["_mta-sts.sts.test"]
        self.policy.body = b"version: STSv1\nmode: testing\nmx: mx.sts.test\nmax_age: 600\n"
        self.dns_clock.advance(3600)  # the TXT record's TTL ran out
        fresh = yield sts.policy_for("sts.test")
        assert (fresh.id, fresh.policy.mode, len(self.policy.requests)) == ("two", "testing", 2)
        with open(os.path.join(self.cache_dir, "sts.test.json")) as f:
            assert json.load(f)["id"] == "two"
        self.zone.records["_mta-sts.sts.test."] = zone("three")["_mta-sts.sts.test"]
        self.policy.body = b"garbage"
        self.dns_clock.advance(3600)
        kept = yield sts.policy_for("sts.test")
        assert (kept.id, kept.policy.mode, len(self.policy.requests)) == ("two", "testing", 3)
        assert "not 'key: value'" in self.logged("mta_sts_fetch_failed")[0]["why"]

    @defer.inlineCallbacks
    def test_an_expired_policy_is_not_used(self):
        clock = task.Clock()
        clock.advance(reactor.seconds())
        self.policy.body = ENFORCE.replace(b"86400", b"60")
        first = yield self.sts(clock=clock).policy_for("sts.test")
        assert first.policy.max_age == 60
        self.policy.status = 404
        clock.advance(61)
        self.dns_clock.advance(61)
        gone = yield self.sts(clock=clock).policy_for("sts.test")
        assert gone is None

    # fetch failures without a cache: no policy, logged, never a crash ------------------------

    @defer.inlineCallbacks
    def test_fetch_failures_are_logged_and_mean_no_policy(self):
        cases = [
            ("redirect", lambda p: (setattr(p, "status", 301), setattr(p, "location", b"https://mta-sts.sts.test/x")),
             "HTTP status 301"),
            ("media type", lambda p: setattr(p, "content_type", b"text/html"), "not text/plain"),
            ("size", lambda p: setattr(p, "body", ENFORCE + b"x: " + b"y" * 70000 + b"\n"), "larger than 65536"),
            ("syntax", lambda p: setattr(p, "body", b"mode enforce\n"), "not 'key: value'"),
        ]  # fmt: skip
        for name, change, why in cases:
            self.policy.__init__()
            change(self.policy)
            shutil.rmtree(self.cache_dir, True)
            got = yield self.sts().policy_for("sts.test")
            assert got is None, name
            assert why in self.logged("mta_sts_fetch_failed")[-1]["why"], name

    @defer.inlineCallbacks
    def test_a_policy_host_with_an_untrusted_certificate_gives_no_policy(self):
        other = make_ca(tempfile.mkdtemp(dir=self.dir))
        got = yield self.sts(ca_file=other.cert_path).policy_for("sts.test")
        assert got is None
        assert self.policy.requests == []
        assert self.logged("mta_sts_fetch_failed")

    @defer.inlineCallbacks
    def test_a_policy_host_that_never_answers_is_given_up_after_the_fetch_timeout(self):
        factory = Factory.forProtocol(Silent)
        factory.seen = []
        port = free_port("127.0.0.7")
        listening = reactor.listenTCP(port, factory, interface="127.0.0.7")
        self.addCleanup(listening.stopListening)
        self.zone.records["mta-sts.sts.test."] = {"A": ["127.0.0.7"]}
        clock = task.Clock()
        clock.advance(reactor.seconds())
        sts = MTASTS(reactor, self.resolver, self.cache_dir, ca_file=self.ca.cert_path, https_port=port, clock=clock,
                     fetch_timeout=30)  # fmt: skip
        outcome: list = []
        sts.policy_for("sts.test").addBoth(outcome.append)
        for _ in range(200):  # bounded poll: the connection is made, the TLS handshake gets no answer
            if factory.seen:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        assert factory.seen
        assert outcome == []
        clock.advance(31)
        for _ in range(100):
            if outcome:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        assert outcome == [None]
        assert self.logged("mta_sts_fetch_failed")[-1]["why"] == "timed out after 30s"
        for proto in factory.seen:
            proto.transport.abortConnection()

    @defer.inlineCallbacks
    def test_domains_with_their_own_tls_policy_and_smarthost_routes_skip_mta_sts(self):
        assert (yield self.sts(skip={"sts.test"}).policy_for("sts.test")) is None
        assert self.policy.requests == []
        peer = self.peer(cert_name=None)
        self.router.routes["sts.test"] = ("[mx.sts.test]", self.smtp_port)
        result = yield self.send(self.agent(self.sts()))
        assert result.status == DELIVERED
        assert peer.messages
        assert self.policy.requests == []


class AccountingTests(unittest.TestCase):
    """The accounting record of an MTA-STS delivery names the policy."""

    timeout = 60

    def test_the_delivered_record_carries_tls_policy(self):
        from pymta.admin.accounting import AccountingLog
        from pymta.envelope import ROUTE_RELAY
        from pymta.queue.manager import QueueManager
        from pymta.queue.store import MemoryQueueStore
        from tests.fakes import ScriptedDeliveryAgent

        class Labelled(ScriptedDeliveryAgent):
            def deliver(self, envelope, recipients, body):
                d = super().deliver(envelope, recipients, body)
                return d.addCallback(lambda rs: [(r.extra.update(tls_policy="mta-sts", tls_failure="certificate-expired"), r)[1] for r in rs])

        directory = tempfile.mkdtemp(prefix="pymta-acct-")
        self.addCleanup(shutil.rmtree, directory, True)
        clock = task.Clock()
        clock.advance(1_700_000_000)
        accounting = AccountingLog(os.path.join(directory, "accounting.jsonl"), clock)
        store = MemoryQueueStore()
        manager = QueueManager(store, {ROUTE_RELAY: Labelled()}, clock, "mx.test", accounting=accounting,
                               route_for=lambda a: ROUTE_RELAY)  # fmt: skip
        manager.startService()
        env = Envelope(qid=new_qid(), sender="s@a.test", arrival=clock.seconds(),
                       recipients=[Recipient("r@sts.test", route=ROUTE_RELAY)])  # fmt: skip
        store.enqueue(env, b"x\r\n")
        manager.notify_incoming(env.qid)
        clock.advance(1)
        accounting.close()
        with open(os.path.join(directory, "accounting.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert [(r["event"], r.get("tls_policy"), r.get("tls_failure")) for r in records] == [
            ("delivered", "mta-sts", "certificate-expired")]
