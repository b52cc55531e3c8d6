"""The SMTP delegate: RCPT routing, envelope built from the transaction, 250 only after the store."""

from __future__ import annotations

import ipaddress
import json
import os

from twisted.internet import defer, task
from twisted.trial import unittest

from pymta.envelope import ROUTE_LOCAL, ROUTE_RELAY
from pymta.inbound.policy import RelayPolicy
from pymta.inbound.receiver import InboundReceiver
from pymta.interfaces import INCOMING, QueueError, QueueFull
from pymta.queue.store import MemoryQueueStore
from tests.fakes import LateInboundState, StaticResolver, TempDirMixin
from tests.sessions import Accepted, Sess, Txn


class ReceiverTests(TempDirMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryQueueStore()
        self.queued: list[str] = []
        self.policy = RelayPolicy(
            ["example.test"], ["alice@example.test"], [ipaddress.ip_network("127.0.0.0/8")], [], self.tmpdir()
        )
        self.receiver = InboundReceiver("mx.example.test", self.policy, self.store, self.clock, self.queued.append)

    def transact(self, receiver: InboundReceiver, rcpts: list[str], body: bytes = b"Subject: x\r\n\r\nhi\r\n"):
        session = Sess(transaction=Txn(sender="someone@example.org"))
        for address in rcpts:
            reply = receiver.rcpt_to(session, address, {})
            if reply is None:
                session.transaction.recipients.append(Accepted(address, notify=("FAILURE",), orcpt="rfc822;" + address))
        results = []
        defer.maybeDeferred(receiver.message, session, body).addBoth(results.append)
        return results[0]

    def _accounting(self, at_pickup: bool):
        from pymta.admin.accounting import AccountingLog
        from tests.test_accounting import HeldRunner

        held = HeldRunner()
        log = AccountingLog(os.path.join(self.tmpdir(), "accounting.jsonl"), self.clock, run=held)
        receiver = InboundReceiver("mx.example.test", self.policy, self.store, self.clock, self.queued.append,
                                   accounting=log, records_at_pickup=at_pickup)  # fmt: skip
        return receiver, held, log.path

    def test_where_a_queue_manager_delivers_the_250_does_not_wait_for_received_records(self) -> None:
        from pymta.admin.accounting import RECEIVED_AT_PICKUP

        receiver, held, path = self._accounting(at_pickup=True)
        reply = self.transact(receiver, ["carol@remote.example"])
        assert reply.code == 250
        self.clock.advance(1)
        assert held.jobs == []
        assert os.path.getsize(path) == 0
        [qid] = self.store.list(INCOMING)
        assert self.store.load(qid).extra[RECEIVED_AT_PICKUP] is True  # the queue manager's to write

    def test_where_nothing_delivers_the_250_waits_for_the_received_records(self) -> None:
        from pymta.admin.accounting import RECEIVED_AT_PICKUP

        receiver, held, path = self._accounting(at_pickup=False)
        session = Sess(transaction=Txn(sender="someone@example.org"))
        assert receiver.rcpt_to(session, "carol@remote.example", {}) is None
        session.transaction.recipients.append(Accepted("carol@remote.example"))
        results: list = []
        defer.maybeDeferred(receiver.message, session, b"Subject: x\r\n\r\nhi\r\n").addBoth(results.append)
        self.clock.advance(0)
        assert results == []  # queued, the record not yet on disk: no answer
        assert len(held.jobs) == 1
        held.run_all()
        assert results[0].code == 250
        [qid] = self.store.list(INCOMING)
        assert RECEIVED_AT_PICKUP not in self.store.load(qid).extra
        with open(path, encoding="utf-8") as f:
            assert [json.loads(line)["event"] for line in f] == ["received"]

    def test_accepted_transaction_is_queued_with_per_recipient_routes(self) -> None:
        reply = self.transact(self.receiver, ["Alice@EXAMPLE.TEST", "carol@remote.example", "alice@example.test"])
        assert reply.code == 250
        assert reply.enhanced == "2.0.0"
        [qid] = self.store.list(INCOMING)
        assert reply.text.endswith(qid)
        assert self.queued == [qid]
        envelope = self.store.load(qid)
        assert envelope.sender == "someone@example.org"
        assert [(r.address, r.route) for r in envelope.recipients] == [
            ("Alice@example.test", ROUTE_LOCAL),
            ("carol@remote.example", ROUTE_RELAY),
        ]
        assert envelope.recipients[0].notify == ("FAILURE",)
        assert envelope.recipients[0].orcpt == "rfc822;Alice@EXAMPLE.TEST"
        assert (envelope.ret, envelope.envid, envelope.body_type) == ("HDRS", "env-1", "8BITMIME")
        body = self.store.read_body(qid)
        assert body.startswith(b"Received: from client.example.org ([127.0.0.1])\r\n\tby mx.example.test (pymta)")
        assert f"with ESMTP id {qid}".encode() in body
        assert body.endswith(b"\r\n\r\nSubject: x\r\n\r\nhi\r\n"[-20:])
        assert envelope.size == len(body)

    def test_arrival_queue_id_and_received_date_are_one_instant_of_the_injected_clock(self) -> None:
        self.clock.advance(0.25)  # far from the system's time: nothing here may read the system clock
        reply = self.transact(self.receiver, ["alice@example.test"])
        assert reply.code == 250
        [qid] = self.store.list(INCOMING)
        assert self.store.load(qid).arrival == 1_700_000_000.25
        value = 0
        for c in qid:
            value = value * 32 + "0123456789ABCDEFGHJKLMNPQRSTVWXYZ".index(c)
        assert value >> 56 == 1_700_000_000_250_000  # microseconds of arrival lead the queue id
        assert b"; Tue, 14 Nov 2023 22:13:20 -0000\r\n" in self.store.read_body(qid).split(b"\r\n\r\n")[0] + b"\r\n"

    def test_refused_recipient_gets_the_policy_reply(self) -> None:
        session = Sess(peer_address="192.0.2.9", transaction=Txn(sender=""))
        reply = self.receiver.rcpt_to(session, "carol@remote.example", {})
        assert (reply.code, reply.enhanced) == (550, "5.7.1")

    def test_full_disk_answers_452_and_other_local_errors_451(self) -> None:
        for error, expected in ((QueueFull("ENOSPC"), (452, "4.3.1")), (QueueError("EIO"), (451, "4.3.0"))):
            failing = MemoryQueueStore()
            failing.fail_with = error
            receiver = InboundReceiver("mx.example.test", self.policy, failing, self.clock)
            reply = self.transact(receiver, ["alice@example.test"])
            assert (reply.code, reply.enhanced) == expected
            self.flushLoggedErrors()

    def test_deliver_after_header_schedules_trusted_mail_and_is_removed(self) -> None:
        body = b"Subject: later\r\nX-Pymta-Deliver-After: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\nhi\r\n"
        assert self.transact(self.receiver, ["alice@example.test"], body=body).code == 250
        [qid] = self.store.list(INCOMING)
        assert self.store.load(qid).not_before == 1796119200.0
        assert b"X-Pymta-Deliver-After" not in self.store.read_body(qid)
        stranger = Sess(peer_address="192.0.2.9", transaction=Txn(sender="a@x.test"))
        stranger.transaction.recipients.append(Accepted("alice@example.test"))
        stranger.transaction.notes["routes"] = {"alice@example.test": ("local", "alice@example.test")}
        results = []
        defer.maybeDeferred(self.receiver.message, stranger, body).addBoth(results.append)
        qid2 = next(q for q in self.store.list(INCOMING) if q != qid)
        assert self.store.load(qid2).not_before == 0.0
        assert b"X-Pymta-Deliver-After" in self.store.read_body(qid2)

    def test_single_recipient_received_header_names_it(self) -> None:
        self.transact(self.receiver, ["alice@example.test"])
        [qid] = self.store.list(INCOMING)
        header = self.store.read_body(qid).split(b"\r\n\r\n", 1)[0]
        assert b"\tfor <alice@example.test>; " in header

    def test_acl_refuses_at_rcpt_and_at_end_of_data_before_anything_is_queued(self) -> None:
        from pymta.config import build_config
        from pymta.inbound.acl import AclPolicy

        acl = AclPolicy(
            build_config(
                {
                    "acl": {
                        "rcpt": [{"recipient": "@blocked.example", "action": "reject", "reply": "550 5.7.1 Not there"}],
                        "data": [{"size": 100, "action": "tempfail", "reply": "452 4.3.4 Too big today"}],
                    }
                }
            ).acl
        )
        receiver = InboundReceiver("mx.example.test", self.policy, self.store, self.clock, acl=acl)
        session = Sess(transaction=Txn(sender="someone@example.org"))
        assert receiver.rcpt_to(session, "x@blocked.example", {}).text == "Not there"
        reply = self.transact(receiver, ["alice@example.test"], body=b"x" * 200)
        assert (reply.code, reply.enhanced) == (452, "4.3.4")
        assert self.store.list(INCOMING) == []
        assert self.transact(receiver, ["alice@example.test"], body=b"small\r\n").code == 250

    def test_strangers_are_greylisted_and_limited_but_relay_clients_never(self) -> None:
        from pymta.inbound.limits import ClientLimits, Greylist

        receiver = InboundReceiver(
            "mx.example.test", self.policy, self.store, self.clock,
            limits=ClientLimits(self.clock, connections_per_client=1),
            greylist=Greylist(self.clock, delay=60, expire=3600, lifetime=86400),
        )  # fmt: skip
        stranger = Sess(peer_address="192.0.2.1", transaction=Txn(sender="a@x.test"))
        assert receiver.connected(stranger) is None
        assert receiver.connected(Sess(peer_address="192.0.2.1")).code == 421
        assert receiver.rcpt_to(stranger, "alice@example.test", {}).enhanced == "4.7.1"
        self.clock.advance(61)
        assert receiver.rcpt_to(stranger, "alice@example.test", {}) is None
        receiver.disconnected(stranger)
        trusted = Sess(peer_address="127.0.0.1", transaction=Txn(sender="a@x.test"))
        assert receiver.connected(trusted) is None
        assert receiver.connected(Sess(peer_address="127.0.0.1")) is None
        assert receiver.rcpt_to(trusted, "carol@remote.example", {}) is None

    def test_limits_and_greylisting_answered_later_by_the_cluster_refuse_alike(self) -> None:
        from pymta.inbound.limits import ClientLimits, Greylist
        from pymta.rate import parse_rate
        from pymta.state.cluster import ClusterInboundState, LocalClusterState

        state = ClusterInboundState(LocalClusterState(self.clock, "n1"), self.clock)
        receiver = InboundReceiver(
            "mx.example.test", self.policy, self.store, self.clock,
            limits=ClientLimits(self.clock, connections_per_client=1, message_rate=parse_rate("1/min"), state=state),
            greylist=Greylist(self.clock, delay=60, expire=3600, lifetime=86400, state=state),
        )  # fmt: skip
        stranger = Sess(peer_address="192.0.2.1", transaction=Txn(sender="a@x.test"))
        assert self.successResultOf(receiver.connected(stranger)) is None
        assert self.successResultOf(receiver.connected(Sess(peer_address="192.0.2.1"))).code == 421
        assert self.successResultOf(receiver.mail_from(stranger, "a@x.test", {})) is None
        assert self.successResultOf(receiver.mail_from(stranger, "a@x.test", {})).code == 450  # 1/min
        assert self.successResultOf(receiver.rcpt_to(stranger, "alice@example.test", {})).enhanced == "4.7.1"
        self.clock.advance(61)
        assert self.successResultOf(receiver.rcpt_to(stranger, "alice@example.test", {})) is None
        receiver.disconnected(stranger)
        assert self.successResultOf(receiver.connected(Sess(peer_address="192.0.2.1"))) is None

    def test_a_client_that_leaves_before_the_cluster_answers_leaves_no_slot_held(self) -> None:
        from pymta.inbound.limits import ClientLimits
        from pymta.state.memory import MemoryInboundState

        memory = MemoryInboundState(self.clock)
        late = LateInboundState(memory)  # a state across the network whose answer to a connection comes later
        receiver = InboundReceiver("mx.example.test", self.policy, self.store, self.clock,
                                   limits=ClientLimits(self.clock, connections_per_client=1, state=late))  # fmt: skip
        session = Sess(peer_address="192.0.2.1")
        d = receiver.connected(session)
        receiver.disconnected(session)
        late.answer()
        assert self.successResultOf(d) is None
        assert memory.connections == {}

    def test_suppressed_recipient_is_refused_at_rcpt_for_relay_clients(self) -> None:
        from pymta.feedback.suppression import SuppressionStore

        store = SuppressionStore(os.path.join(self.tmpdir(), "s.sqlite"), self.clock)
        self.addCleanup(store.close)
        store.add("carol@remote.example", "userunknown", "bounce")
        store.add("dave@remote.example", "unsubscribed", "unsubscribe", scope="other.example")
        receiver = InboundReceiver("mx.example.test", self.policy, self.store, self.clock, suppression=store)
        session = Sess(transaction=Txn(sender="news@example.org"))
        reply = receiver.rcpt_to(session, "Carol@Remote.Example", {})
        assert (reply.code, reply.enhanced) == (550, "5.7.1")
        assert "userunknown" in reply.text
        assert receiver.rcpt_to(session, "dave@remote.example", {}) is None  # suppressed for another sender only


class SenderLoginTests(TempDirMixin, unittest.TestCase):
    """``[submission] sender_login = "strict"``: an authenticated user sends only as an owned sender."""

    def setUp(self) -> None:
        from pymta.inbound.auth import SenderLogins

        self.clock = task.Clock()
        self.store = MemoryQueueStore()
        policy = RelayPolicy(["example.test"], None, [], [], self.tmpdir())
        logins = SenderLogins({"app": frozenset({"news@example.test", "@shop.example"})})
        self.receiver = InboundReceiver("mx.example.test", policy, self.store, self.clock, sender_login=logins)

    def send(self, sender: str, body: bytes, user: str | None = "app"):
        session = Sess(peer_address="192.0.2.5", auth_user=user, transaction=Txn(sender=sender))
        reply = self.receiver.mail_from(session, sender, {})
        if reply is not None:
            return reply
        assert self.receiver.rcpt_to(session, "alice@example.test", {}) is None
        session.transaction.recipients.append(Accepted("alice@example.test"))
        results = []
        defer.maybeDeferred(self.receiver.message, session, body).addBoth(results.append)
        return results[0]

    def test_mail_from_an_unowned_address_is_refused_553_571(self) -> None:
        reply = self.send("ceo@example.test", b"From: news@example.test\r\n\r\nhi\r\n")
        assert (reply.code, reply.enhanced) == (553, "5.7.1")
        assert "not owned by user app" in reply.text
        assert self.store.list(INCOMING) == []

    def test_a_from_header_the_user_does_not_own_is_refused_after_data(self) -> None:
        for header in (b"From: CEO <ceo@example.test>", b"From: news@example.test, ceo@example.test",
                       b"From: news@example.test\r\nFrom: ceo@example.test", b"From:\r\n ceo@example.test",
                       b"From: undisclosed:;"):  # fmt: skip
            reply = self.send("news@example.test", header + b"\r\nSubject: x\r\n\r\nhi\r\n")
            assert (reply.code, reply.enhanced) == (553, "5.7.1"), header
        assert self.store.list(INCOMING) == []

    def test_owned_senders_the_null_sender_and_unauthenticated_clients_pass(self) -> None:
        body = b"From: News Desk <NEWS@example.test>\r\nSubject: x\r\n\r\nFrom: ceo@example.test\r\n"
        assert self.send("news@example.test", body).code == 250
        assert self.send("orders@shop.example", b"From: sales@shop.example\r\n\r\nhi\r\n").code == 250
        assert self.send("", b"From: news@example.test\r\n\r\nhi\r\n").code == 250
        assert self.send("ceo@example.test", b"From: ceo@example.test\r\n\r\nhi\r\n", user=None).code == 250
        assert len(self.store.list(INCOMING)) == 4


class DNSBLTests(unittest.TestCase):
    def test_listed_clients_are_refused_and_failures_never_refuse(self) -> None:
        from pymta.inbound.dnsbl import DNSBL, query_name
        from pymta.smtp.replies import Reply

        assert query_name("192.0.2.7", "bl.test") == "7.2.0.192.bl.test"
        assert query_name("2001:db8::1", "bl.test").endswith(".8.b.d.0.1.0.0.2.bl.test")

        resolver = StaticResolver({"7.2.0.192.bl.test": {"A": ["127.0.0.2"]}}, servfail=["8.2.0.192.bl.test"])
        bl = DNSBL(resolver, ("bl.test",), Reply(554, "5.7.1", "Listed"))
        results = []
        for ip in ("192.0.2.7", "192.0.2.8", "192.0.2.9"):
            bl.check(ip).addCallback(results.append)
        assert results[0].code == 554
        assert "bl.test" in results[0].text
        assert results[1:] == [None, None]


class ReverseLookupTests(unittest.TestCase):
    def test_forward_confirmed_name_is_used_by_rdns_acls_and_the_received_header(self) -> None:
        from pymta.config import build_config
        from pymta.inbound.acl import AclPolicy

        resolver = StaticResolver({
            "1.2.0.192.in-addr.arpa": {"PTR": ["mail.good.example."]},
            "2.2.0.192.in-addr.arpa": {"PTR": ["fake.example."]},
            "mail.good.example": {"A": ["192.0.2.1"]},
            "fake.example": {"A": ["198.51.100.9"]},
        })
        acl = AclPolicy(build_config({"acl": {"connect": [{"rdns": "unknown", "action": "reject"}]}}).acl)
        policy = RelayPolicy(["example.test"], None, [], [], "/nonexistent")
        receiver = InboundReceiver("mx.example.test", policy, MemoryQueueStore(), task.Clock(), acl=acl,
                                   resolver=resolver, reverse_lookup=True)  # fmt: skip
        results = {}
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            session = Sess(peer_address=ip)
            receiver.connected(session).addCallback(lambda r, ip=ip, s=session: results.__setitem__(ip, (r, s)))
        assert results["192.0.2.1"][0] is None
        assert results["192.0.2.1"][1].notes["client_name"] == "mail.good.example"
        assert results["192.0.2.2"][0].code == 550  # the PTR name does not point back: unknown
        assert results["192.0.2.3"][0].code == 550


def test_mail_is_refused_452_431_when_the_queue_file_system_is_short_of_space(tmp_path):
    free = [10_000_000]
    policy = RelayPolicy(["example.test"], None, [ipaddress.ip_network("127.0.0.0/8")], [], str(tmp_path))
    receiver = InboundReceiver("mx.example.test", policy, MemoryQueueStore(), task.Clock(),
                               free_space=lambda: free[0], space_needed=5_000_000)  # fmt: skip
    session = Sess(peer_address="192.0.2.1")
    assert receiver.mail_from(session, "a@b.example", {}) is None
    free[0] = 5_000_000
    reply = receiver.mail_from(session, "a@b.example", {})
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    trusted = Sess(peer_address="127.0.0.1")  # a full disk is full for relay clients too
    assert receiver.mail_from(trusted, "a@b.example", {}).code == 452


def test_free_space_asks_the_kernel_at_most_once_a_second(tmp_path, monkeypatch):
    import os

    from twisted.internet.task import Clock

    from pymta.tap import FreeSpace

    calls = []
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: calls.append(path) or real(path))
    clock = Clock()
    free = FreeSpace(str(tmp_path), clock)
    first = free()
    assert first > 0
    for _ in range(100):
        clock.advance(0.005)
        assert free() == first
    assert calls == [str(tmp_path)]
    clock.advance(0.6)
    free()
    assert calls == [str(tmp_path)] * 2
