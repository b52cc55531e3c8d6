"""Every boundary of pymta.interfaces: the real implementation and each fake in tests/ run the same
contract (``verifyObject`` plus behaviour), so a fake cannot drift from what it stands for."""

from __future__ import annotations

import ipaddress
import os
import random
from typing import ClassVar

from twisted.internet import error, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web import server
from zope.interface.verify import verifyObject

from pymta.config import build_config
from pymta.dns import Resolver
from pymta.events.webhooks import treq_post
from pymta.feedback.suppression import SuppressionStore
from pymta.inbound.acl import AclPolicy
from pymta.inbound.auth import Authenticator, hash_password
from pymta.inbound.mailbox import MaildirDeliveryAgent
from pymta.inbound.milter import MilterScanner
from pymta.inbound.policy import RelayPolicy
from pymta.inbound.receiver import InboundReceiver
from pymta.inbound.rspamd import RspamdScanner
from pymta.inbound.scan import REJECT, TEMPFAIL, ScanError, Verdict, scanner_reply
from pymta.interfaces import IPolicy, IRecipientPolicy, ISession, ISuspensions
from pymta.queue.scheduler import TimerHeapScheduler
from pymta.queue.store import MemoryQueueStore
from pymta.smtp.replies import Reply
from pymta.smtp.server import Session
from pymta.state.suspensions import SQLiteSuspensions
from tests.contract_authenticator import AuthenticatorContract
from tests.contract_delivery_agent import DeliveryAgentContract
from tests.contract_resolver import ResolverContract
from tests.contract_scanner import ScannerContract
from tests.contract_scheduler import SchedulerContract
from tests.contract_smtp_delegate import SMTPServerDelegateContract
from tests.contract_suppression import SuppressionListContract
from tests.contract_webhook_post import WebhookPostContract
from tests.dnsserver import DNSServer, Zone
from tests.fakes import ScriptedDeliveryAgent, StaticResolver, TempDirMixin
from tests.fs_faults import started_pool
from tests.mta_process import free_port
from tests.scanners import ScriptedMilter, ScriptedRspamd
from tests.sessions import Sess
from tests.test_alias_queue import RecordingAgent as AliasRecordingAgent
from tests.test_delivery import HoldingPeer, Peer
from tests.test_events import ScriptedReceiver
from tests.test_feedback_gate import RecordingAgent as GateRecordingAgent
from tests.test_scan import Scripted
from tests.test_smtp_server import FakeAuth, FakeDelegate
from tests.webhook_receiver import Hook

# -- IScheduler ---------------------------------------------------------------------------------


class TimerHeapSchedulerContractTests(SchedulerContract, unittest.TestCase):
    def make_scheduler(self, clock):
        return TimerHeapScheduler(clock)


# -- IDeliveryAgent -----------------------------------------------------------------------------


class ScriptedDeliveryAgentContractTests(DeliveryAgentContract, unittest.TestCase):
    def make_agent(self):
        return ScriptedDeliveryAgent()


class FeedbackGateRecordingAgentContractTests(DeliveryAgentContract, unittest.TestCase):
    def make_agent(self):
        return GateRecordingAgent({})


class AliasQueueRecordingAgentContractTests(DeliveryAgentContract, unittest.TestCase):
    def make_agent(self):
        return AliasRecordingAgent()


class MaildirDeliveryAgentContractTests(DeliveryAgentContract, TempDirMixin, unittest.TestCase):
    route = "local"

    def make_agent(self):
        return MaildirDeliveryAgent(os.path.join(self.tmpdir(), "mail"), "mx.example.test", reactor, started_pool(self))


# -- IResolver ----------------------------------------------------------------------------------


class ResolverContractTests(ResolverContract, unittest.TestCase):
    def make_resolver(self, zone, servfail):
        server = DNSServer(Zone(zone, servfail=servfail)).start()
        self.addCleanup(server.stop)
        pool = ThreadPool(1, 4)
        pool.start()
        self.addCleanup(pool.stop)
        return Resolver(reactor, pool, [server.address], timeout=0.5, clock=task.Clock(), rng=random.Random(3))


class StaticResolverContractTests(ResolverContract, unittest.TestCase):
    def make_resolver(self, zone, servfail):
        return StaticResolver(zone, servfail)


# -- ISuppressionList ---------------------------------------------------------------------------


class SuppressionStoreContractTests(SuppressionListContract, TempDirMixin, unittest.TestCase):
    def make_list(self, clock):
        store = SuppressionStore(os.path.join(self.tmpdir(), "suppression.sqlite"), clock)
        self.addCleanup(store.close)
        return store


# -- Scanner (pymta.inbound.scan) ---------------------------------------------------------------


class ScriptedScannerContractTests(ScannerContract, unittest.TestCase):
    def make_scanner(self, answer):
        return Scripted("scripted", {
            "accept": Verdict(),
            "reject": Verdict(REJECT, scanner_reply(554, "5.7.1", "no", REJECT)),
            "tempfail": Verdict(TEMPFAIL, scanner_reply(451, "4.7.1", "later", TEMPFAIL)),
            "broken": ScanError("not the protocol"),
        }[answer], on_error=self.on_error)  # fmt: skip


class RspamdScannerContractTests(ScannerContract, unittest.TestCase):
    ACTIONS: ClassVar[dict[str, str]] = {"accept": "no action", "reject": "reject", "tempfail": "soft reject"}

    def make_scanner(self, answer):
        peer = ScriptedRspamd()
        self.addCleanup(peer.close)
        if answer == "broken":
            peer.raw = b"not json"
        else:
            peer.answer = {"action": self.ACTIONS[answer], "score": 1.0}
        scanner = RspamdScanner(f"http://127.0.0.1:{peer.port}", reactor, 5.0, self.on_error)
        self.addCleanup(scanner.close)
        return scanner


class MilterScannerContractTests(ScannerContract, unittest.TestCase):
    def make_scanner(self, answer):
        peer = ScriptedMilter()
        self.addCleanup(peer.close)
        peer.mode = "garbage" if answer == "broken" else answer
        return MilterScanner(f"inet:127.0.0.1:{peer.port}", reactor, 5.0, self.on_error)


# -- Authenticator (pymta.inbound.auth) ---------------------------------------------------------


class AuthenticatorContractTests(AuthenticatorContract, unittest.TestCase):
    def make_authenticator(self, users, max_failures):
        hashed = {user: hash_password(password, n=2**10) for user, password in users.items()}
        return Authenticator(hashed, reactor, started_pool(self), max_failures=max_failures)


class FakeAuthContractTests(AuthenticatorContract, unittest.TestCase):
    def make_authenticator(self, users, max_failures):
        return FakeAuth(users, max_failures)


# -- webhook post (pymta.events.webhooks) ---------------------------------------------------------


class TreqPostContractTests(WebhookPostContract, TempDirMixin, unittest.TestCase):
    def make_post(self, answer):
        post = treq_post(reactor, connect_timeout=5.0)
        self.addCleanup(post.pool.closeCachedConnections)
        if answer == "refused":
            return post, f"http://127.0.0.1:{free_port()}/hook"
        directory = self.tmpdir()
        mode = os.path.join(directory, "mode")
        with open(mode, "w", encoding="ascii") as f:
            f.write(str(answer))
        port = reactor.listenTCP(0, server.Site(Hook(os.path.join(directory, "log"), mode)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return post, f"http://127.0.0.1:{port.getHost().port}/hook"


class ScriptedReceiverPostContractTests(WebhookPostContract, unittest.TestCase):
    def make_post(self, answer):
        receiver = ScriptedReceiver([error.ConnectionRefusedError()] if answer == "refused" else [answer])
        return receiver.post, "http://127.0.0.1/hook"


# -- IPolicy, IRecipientPolicy ------------------------------------------------------------------


def test_acl_policy_refuses_what_a_rule_matches_and_lets_the_rest_go_on():
    policy = AclPolicy(build_config({"acl": {"rcpt": [{"client": "192.0.2.0/24", "action": "reject"}]}}).acl)
    assert verifyObject(IPolicy, policy)
    refused = policy.check("rcpt", Sess(peer_address="192.0.2.9"), recipient="a@b.test")
    assert isinstance(refused, Reply)
    assert refused.code // 100 == 5
    assert policy.check("rcpt", Sess(peer_address="198.51.100.1"), recipient="a@b.test") is None
    assert policy.check("connect", Sess(peer_address="192.0.2.9")) is None


def test_relay_policy_routes_local_mail_and_relays_for_trusted_clients_only(tmp_path):
    policy = RelayPolicy(["example.test"], None, [ipaddress.ip_network("127.0.0.0/8")], [], str(tmp_path))
    assert verifyObject(IRecipientPolicy, policy)
    assert policy.may_relay("127.0.0.1")
    assert not policy.may_relay("192.0.2.1")
    assert policy.may_relay("192.0.2.1", "alice")
    local = policy.recipient("bob@example.test", "192.0.2.1")
    assert [t.route for t in local.deliveries()] == ["local"]
    assert policy.recipient("bob@elsewhere.test", "192.0.2.1").reply.enhanced == "5.7.1"
    relayed = policy.recipient("bob@elsewhere.test", "127.0.0.1")
    (rcpt,) = policy.queue_recipients(relayed.deliveries(), "bob@elsewhere.test", None, None, "a@example.test", 0.0)
    assert (rcpt.address, rcpt.route, rcpt.orcpt) == ("bob@elsewhere.test", "relay", "rfc822;bob@elsewhere.test")
    assert policy.forward_sender("a@example.org", 0.0) == "a@example.org"  # no SRS configured
    assert not policy.over_quota("bob@example.test")


# -- ISMTPServerDelegate, ISession --------------------------------------------------------------


class FakeDelegateContractTests(SMTPServerDelegateContract, unittest.TestCase):
    def make_delegate(self):
        return FakeDelegate()


class InboundReceiverContractTests(SMTPServerDelegateContract, unittest.TestCase):
    def make_delegate(self):
        policy = RelayPolicy(["example.test"], None, [ipaddress.ip_network("127.0.0.0/8")], [], "/nonexistent")
        return InboundReceiver("mx.example.test", policy, MemoryQueueStore(), task.Clock())


class DeliveryPeerDelegateContractTests(SMTPServerDelegateContract, unittest.TestCase):
    def make_delegate(self):
        return Peer("127.0.0.2").delegate


class HoldingPeerDelegateContractTests(SMTPServerDelegateContract, unittest.TestCase):
    def make_delegate(self):
        self.peer = HoldingPeer("127.0.0.1", 0, release_at=2)
        self.addCleanup(self.peer.stop)
        return self.peer.delegate

    def settle(self, delegate):
        self.peer.release()


def test_the_server_session_and_its_stand_in_provide_the_session_interface():
    for session in (Session(peer_address="127.0.0.1", peer_port=1), Sess()):
        assert verifyObject(ISession, session)


# -- ISuspensions -------------------------------------------------------------------------------


def test_suspensions_hold_matching_mail_until_they_lapse_or_are_lifted(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    suspensions = SQLiteSuspensions(str(tmp_path / "suspensions.sqlite"), clock)
    assert verifyObject(ISuspensions, suspensions)
    short = suspensions.add("domain", "Remote.Test.", 60, "asked to wait")
    long = suspensions.add("campaign", "spring", 3600, "review")
    assert [s["id"] for s in suspensions.in_force()] == [short["id"], long["id"]]  # soonest to lapse first
    assert suspensions.match(domain="remote.test")["reason"] == "asked to wait"
    assert suspensions.match(domain="other.test", campaign="autumn") is None
    clock.advance(61)
    assert suspensions.match(domain="remote.test") is None
    assert suspensions.remove(long["id"])["kind"] == "campaign"
    assert suspensions.remove(long["id"]) is None
    assert suspensions.in_force() == []
    suspensions.close()
