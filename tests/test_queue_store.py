"""The queue stores: contract tests for the maildir spool and the in-memory fake, durability of the spool."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from pymta.interfaces import QueueFull
from pymta.queue.store import MemoryQueueStore
from tests.contract_queue_store import BODY, QueueStoreContract, make_envelope


class MemoryQueueStoreContractTests(QueueStoreContract, unittest.TestCase):
    def make_store(self):
        return MemoryQueueStore()


class MemoryQueueStoreFaultTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_injected_failure_fails_every_write_until_cleared(self):
        store = MemoryQueueStore()
        env = make_envelope()
        store.fail_with = QueueFull()
        yield self.assertFailure(store.enqueue(env, BODY), QueueFull)
        self.assertIsNone(store.state(env.qid))
        store.fail_with = None
        yield store.enqueue(env, BODY)
        store.fail_with = QueueFull()
        yield self.assertFailure(store.update(env), QueueFull)
        yield self.assertFailure(store.remove(env.qid), QueueFull)
        self.assertEqual(store.read_body(env.qid), BODY)
