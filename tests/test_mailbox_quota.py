"""Maildir delivery with a recipient delimiter (Maildir++ sub-folders) and mailbox quotas
(Maildir++ ``maildirsize``), at delivery and at the RCPT stage."""

from __future__ import annotations

import ipaddress
import mailbox
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pymta.config import ConfigError, build_config
from pymta.envelope import DEFERRED, DELIVERED, FAILED, Envelope, Recipient, new_qid
from pymta.inbound.aliases import AliasTables
from pymta.inbound.mailbox import MaildirDeliveryAgent
from pymta.inbound.policy import RelayPolicy
from pymta.inbound.quota import Quotas, known_usage
from pymta.inbound.receiver import InboundReceiver
from pymta.queue.store import MemoryQueueStore
from tests.fs_faults import started_pool
from tests.sessions import Sess, Txn

BODY = b"From: a@example.org\r\nSubject: hi\r\n\r\n" + b"x" * 400 + b"\r\n"


def envelope(*recipients: Recipient) -> Envelope:
    return Envelope(new_qid(), "a@example.org", list(recipients), size=len(BODY))


class DelimiterFolderTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.pool = started_pool(self)

    def agent(self, **kw):
        return MaildirDeliveryAgent(self.root, "mx.example.test", reactor, self.pool, delimiter="+", **kw)

    @defer.inlineCallbacks
    def test_an_extension_goes_into_its_maildir_folder_when_asked(self):
        env = envelope(Recipient("alice+News@example.test", route="local"), Recipient("alice+a.b@example.test", route="local"))
        results = yield self.agent(delimiter_folders=True).deliver(env, env.recipients, BODY)
        self.assertEqual([r.status for r in results], [DELIVERED, DELIVERED])
        home = os.path.join(self.root, "example.test", "alice")
        folder = mailbox.Maildir(os.path.join(home, ".news"), create=False)
        [message] = list(folder)
        self.assertEqual(message["Delivered-To"], "alice+News@example.test")
        self.assertTrue(os.path.exists(os.path.join(home, ".news", "maildirfolder")))
        # "a.b" would be a nested Maildir++ folder: such extensions stay in the inbox
        self.assertEqual(len(os.listdir(os.path.join(home, "new"))), 1)
        self.assertFalse(os.path.exists(os.path.join(home, "+a.b")))

    @defer.inlineCallbacks
    def test_without_folders_an_extension_is_delivered_to_the_inbox_with_the_original_recipient(self):
        rcpt = Recipient("alice+news@example.test", route="local", orcpt="rfc822;sales@example.test")
        env = envelope(rcpt)
        yield self.agent().deliver(env, env.recipients, BODY)
        [message] = list(mailbox.Maildir(os.path.join(self.root, "example.test", "alice"), create=False))
        self.assertEqual(message["X-Original-To"], "sales@example.test")
        self.assertEqual(message["Delivered-To"], "alice+news@example.test")
        self.assertEqual(os.listdir(os.path.join(self.root, "example.test")), ["alice"])


class QuotaTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.pool = started_pool(self)
        self.home = os.path.join(self.root, "example.test", "alice")

    def agent(self, action="defer", **overrides):
        quotas = Quotas(1200, {"carol@example.test": 0, "@big.test": 10**9, **overrides})
        return MaildirDeliveryAgent(self.root, "mx.example.test", reactor, self.pool, delimiter="+", quotas=quotas,
                                    quota_action=action)  # fmt: skip

    def deliver(self, agent, *addresses):
        env = envelope(*(Recipient(a, route="local") for a in addresses))
        return agent.deliver(env, env.recipients, BODY)

    @defer.inlineCallbacks
    def test_a_message_past_the_quota_is_deferred_452_422_and_usage_is_kept_in_maildirsize(self):
        agent = self.agent()
        first = yield self.deliver(agent, "alice@example.test", "alice+x@example.test")
        self.assertEqual([r.status for r in first], [DELIVERED, DELIVERED])
        names = os.listdir(os.path.join(self.home, "new"))
        self.assertEqual(known_usage(self.home, 1200), sum(int(name.rpartition(",S=")[2]) for name in names))
        with open(os.path.join(self.home, "maildirsize")) as f:
            self.assertEqual(f.readline(), "1200S\n")
        [over] = yield self.deliver(agent, "alice@example.test")
        self.assertEqual((over.status, over.code, over.enhanced), (DEFERRED, 452, "4.2.2"))
        self.assertEqual(len(os.listdir(os.path.join(self.home, "new"))), 2)
        others = yield self.deliver(agent, "carol@example.test", "x@big.test", "x@big.test", "x@big.test")
        self.assertEqual([r.status for r in others], [DELIVERED] * 4)  # no quota / a domain's own quota

    @defer.inlineCallbacks
    def test_bounce_action_fails_552_522(self):
        agent = self.agent("bounce")
        yield self.deliver(agent, "alice@example.test", "alice@example.test")
        [over] = yield self.deliver(agent, "alice@example.test")
        self.assertEqual((over.status, over.code, over.enhanced), (FAILED, 552, "5.2.2"))

    @defer.inlineCallbacks
    def test_a_stale_over_quota_count_is_recalculated_after_a_client_deleted_mail(self):
        agent = self.agent()
        yield self.deliver(agent, "alice@example.test", "alice@example.test")
        [over] = yield self.deliver(agent, "alice@example.test")
        self.assertEqual(over.status, DEFERRED)
        new = os.path.join(self.home, "new")
        for name in os.listdir(new):  # an IMAP client expunges without touching maildirsize
            os.remove(os.path.join(new, name))
        [still] = yield self.deliver(agent, "alice@example.test")
        self.assertEqual(still.status, DEFERRED)  # the count is fresh: trusted for 15 minutes
        old = reactor.seconds() - 16 * 60
        os.utime(os.path.join(self.home, "maildirsize"), (old, old))
        [ok] = yield self.deliver(agent, "alice@example.test")
        self.assertEqual(ok.status, DELIVERED)


class RcptQuotaTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.root, "example.test", "alice")
        os.makedirs(os.path.join(self.home, "tmp"))
        tables = AliasTables(None, {"team@example.test": ("alice@example.test", "bob@example.test")})
        self.policy = RelayPolicy(["example.test"], ["alice@example.test", "bob@example.test"],
                                  [ipaddress.ip_network("127.0.0.0/8")], [], self.root, tables=tables, delimiter="+",
                                  quotas=Quotas(1000))  # fmt: skip
        self.receiver = InboundReceiver("mx.example.test", self.policy, MemoryQueueStore(), task.Clock())

    def usage(self, octets: int) -> None:
        with open(os.path.join(self.home, "maildirsize"), "w") as f:
            f.write(f"1000S\n{octets} 1\n")

    def rcpt(self, address: str, size: int | None = None):
        return self.receiver.rcpt_to(Sess(transaction=Txn(sender="s@example.org", declared_size=size)), address, {})

    def test_a_known_full_mailbox_answers_452_422_at_rcpt(self):
        self.assertIsNone(self.rcpt("alice@example.test"))  # usage unknown: delivery decides
        self.usage(1000)
        reply = self.rcpt("alice+tag@example.test")
        self.assertEqual((reply.code, reply.enhanced), (452, "4.2.2"))
        self.assertIsNone(self.rcpt("team@example.test"))  # bob still has room: the alias is taken

    def test_the_declared_size_counts(self):
        self.usage(700)
        self.assertIsNone(self.rcpt("alice@example.test", 200))
        self.assertEqual(self.rcpt("alice@example.test", 400).code, 452)


def test_quota_configuration_sizes_and_overrides():
    config = build_config({"mailbox": {"quota": "1GB", "quotas": {"Alice@Example.Test": "5GB", "@Other.Test": 0},
                                       "quota_action": "bounce"}})  # fmt: skip
    assert config.mailbox.quota == 1 << 30
    assert config.mailbox.quotas == {"alice@example.test": 5 << 30, "@other.test": 0}
    quotas = Quotas(config.mailbox.quota, config.mailbox.quotas)
    assert [quotas.limit_for(a) for a in ("ALICE@example.test", "x@other.test", "y@example.test")] == [5 << 30, 0, 1 << 30]
    for bad in ({"quota": "lots"}, {"quota_action": "drop"}, {"quotas": {"not-an-address": "1MB"}}):
        try:
            build_config({"mailbox": bad}, "p.toml")
        except ConfigError as e:
            assert str(e).startswith("p.toml: mailbox.")
            assert "\n" not in str(e)
        else:
            raise AssertionError(f"{bad} was accepted")


class ForwardingLoopTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_message_already_delivered_to_the_recipient_here_bounces_546(self):
        root = os.path.abspath(self.mktemp())
        agent = MaildirDeliveryAgent(root, "mx.example.test", reactor, started_pool(self), delimiter="+")
        body = b"Delivered-To: Alice@example.test\r\nSubject: again\r\n\r\nDelivered-To: carol@example.test\r\n"
        env = envelope(Recipient("alice@example.test", route="local"), Recipient("carol@example.test", route="local"))
        results = yield agent.deliver(env, env.recipients, body)
        self.assertEqual([(r.status, r.code, r.enhanced) for r in results],
                         [(FAILED, 554, "5.4.6"), (DELIVERED, 250, "2.0.0")])  # only the header counts
        self.assertFalse(os.path.exists(os.path.join(root, "example.test", "alice")))
