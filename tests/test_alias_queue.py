"""Expansion happens once, at accept: the queue holds the real recipients (the original as ORCPT),
forwarded ones carry an SRS sender the queue manager hands to the relay, failed branches bounce."""

from __future__ import annotations

import ipaddress
import random

from twisted.internet import defer, task
from zope.interface import implementer

from pymta.envelope import DELIVERED, FAILED, ROUTE_LOCAL, ROUTE_RELAY, DeliveryResult
from pymta.inbound.aliases import AliasTables
from pymta.inbound.policy import RelayPolicy
from pymta.inbound.receiver import InboundReceiver
from pymta.inbound.srs import SRS
from pymta.interfaces import INCOMING, IDeliveryAgent
from pymta.queue.manager import QueueManager
from pymta.queue.store import MemoryQueueStore
from tests.sessions import Accepted, Sess, Txn

SECRET = "a-secret-of-twenty-chars"


@implementer(IDeliveryAgent)
class RecordingAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def deliver(self, envelope, recipients, body):
        self.calls.append((envelope.sender, [r.address for r in recipients]))
        return defer.succeed([DeliveryResult(r.address, DELIVERED, 250, "2.0.0", "ok") for r in recipients])


def setup(tmp_path, aliases: str, max_expanded: int = 100):
    path = tmp_path / "aliases"
    path.write_text(aliases)
    clock = task.Clock()
    clock.advance(1_700_000_000)
    policy = RelayPolicy(["example.test"], ["alice@example.test", "carol@example.test"],
                         [ipaddress.ip_network("127.0.0.0/8")], [], str(tmp_path / "mail"),
                         postmaster="alice@example.test", tables=AliasTables(str(path)),
                         srs=SRS(SECRET, "mx.example.test"), delimiter="+", clock=clock)  # fmt: skip
    store = MemoryQueueStore()
    receiver = InboundReceiver("mx.example.test", policy, store, clock, max_expanded=max_expanded)
    return clock, store, receiver


def transact(receiver, rcpts, sender="bob@origin.test", orcpt=None):
    session = Sess(peer_address="192.0.2.7", transaction=Txn(sender=sender))
    replies = []
    for address in rcpts:
        reply = receiver.rcpt_to(session, address, {})
        replies.append(reply)
        if reply is None:
            session.transaction.recipients.append(Accepted(address, orcpt=orcpt))
    results = []
    defer.maybeDeferred(receiver.message, session, b"Subject: x\r\n\r\nhi\r\n").addBoth(results.append)
    return replies, results[0]


def test_the_queue_holds_the_expanded_recipients_with_the_original_as_orcpt(tmp_path):
    _clock, store, receiver = setup(tmp_path, "sales: alice, dave@remote.test, gone\nteam: carol, alice\n")
    replies, reply = transact(receiver, ["sales@example.test", "team@example.test", "carol@example.test"])
    assert replies == [None, None, None]
    assert reply.code == 250
    [qid] = store.list(INCOMING)
    envelope = store.load(qid)
    assert envelope.sender == "bob@origin.test"
    got = [(r.address, r.route, r.orcpt, r.state) for r in envelope.recipients]
    assert got == [
        ("alice@example.test", ROUTE_LOCAL, "rfc822;sales@example.test", "pending"),
        ("dave@remote.test", ROUTE_RELAY, "rfc822;sales@example.test", "pending"),
        ("gone@example.test", ROUTE_LOCAL, "rfc822;sales@example.test", FAILED),
        ("carol@example.test", ROUTE_LOCAL, "rfc822;team@example.test", "pending"),
    ]  # alice once; carol's own RCPT adds nothing new
    forwarded = envelope.recipients[1]
    assert forwarded.sender.startswith("SRS0=")
    assert forwarded.sender.endswith("=origin.test=bob@mx.example.test")
    assert [r.sender for r in envelope.recipients if r is not forwarded] == [None, None, None]
    assert envelope.recipients[2].reply["enhanced"] == "5.1.1"


def test_a_client_orcpt_is_kept_and_the_null_sender_is_not_rewritten(tmp_path):
    _clock, store, receiver = setup(tmp_path, "sales: dave@remote.test\n")
    transact(receiver, ["sales@example.test"], sender="", orcpt="rfc822;first@elsewhere.test")
    [r] = store.load(store.list(INCOMING)[0]).recipients
    assert (r.orcpt, r.sender) == ("rfc822;first@elsewhere.test", "")


def test_the_manager_relays_forwarded_recipients_with_their_srs_sender_and_bounces_failed_branches(tmp_path):
    clock, store, receiver = setup(tmp_path, "sales: alice, dave@remote.test, erin@remote.test, gone\n")
    transact(receiver, ["sales@example.test"], sender="bob@example.test")
    transact(receiver, ["sales@example.test"])
    relay, local = RecordingAgent(), RecordingAgent()
    manager = QueueManager(store, {ROUTE_RELAY: relay, ROUTE_LOCAL: local}, clock, "mx.example.test",
                           route_for=lambda a: ROUTE_LOCAL if a.endswith("@example.test") else ROUTE_RELAY,
                           rng=random.Random(1))  # fmt: skip
    manager.startService()
    forwarded = [(sender, rcpts) for sender, rcpts in relay.calls if sender]  # not the notices (null sender)
    senders = sorted(sender for sender, _ in forwarded)
    # our own sender domain is not rewritten; the other sender is, once for both forwarded recipients
    assert senders[1] == "bob@example.test"
    assert senders[0].startswith("SRS0=")
    assert sorted(r for _, rcpts in forwarded for r in rcpts) == ["dave@remote.test", "dave@remote.test",
                                                                     "erin@remote.test", "erin@remote.test"]  # fmt: skip
    assert len(forwarded) == 2
    assert all(len(rcpts) == 2 for _, rcpts in forwarded)
    # the failed branch "gone" is bounced to each original sender, from the null sender
    notices = sorted(r for s, rcpts in relay.calls + local.calls if s == "" for r in rcpts)
    assert notices == ["bob@example.test", "bob@origin.test"]
    assert store.list(INCOMING) == []
    assert manager.scheduler is not None


def test_a_transaction_cannot_grow_past_its_expanded_recipient_bound(tmp_path):
    members = ", ".join(f"u{i}@remote.test" for i in range(30))
    _clock, _store, receiver = setup(tmp_path, f"big: {members}\n", max_expanded=50)
    replies, _ = transact(receiver, ["big@example.test", "big+2@example.test"])
    assert replies[0] is None
    assert (replies[1].code, replies[1].enhanced) == (452, "4.5.3")


def test_a_message_that_went_round_too_many_hosts_is_refused_546(tmp_path):
    _clock, store, receiver = setup(tmp_path, "sales: dave@remote.test\n")
    session = Sess(peer_address="192.0.2.7", transaction=Txn(sender="bob@origin.test"))
    assert receiver.rcpt_to(session, "sales@example.test", {}) is None
    session.transaction.recipients.append(Accepted("sales@example.test"))
    looped = b"".join(b"Received: from a (b [192.0.2.1])\r\n\tby c; Tue, 1 Dec 2026 00:00:00 +0000\r\n" for _ in range(51))
    reply = receiver.message(session, looped + b"Subject: x\r\n\r\nhi\r\n")
    assert (reply.code, reply.enhanced) == (554, "5.4.6")
    assert store.list(INCOMING) == []
    results = []
    defer.maybeDeferred(receiver.message, session, looped[: len(looped) // 51 * 50] + b"\r\nhi\r\n").addBoth(results.append)
    assert results[0].code == 250
