"""Suppression shared through a Redis stream (a real redis-server on loopback): a change on one
node reaches the others' SQLite replicas, survives Redis being away, and a node that was down
catches up from where it stopped reading."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer, task
from twisted.trial import unittest

from pymta.state.cluster import RedisClusterState, redis_connector
from pymta.state.replica import ReplicatedSuppressionStore
from tests.redis_server import RedisServer, have_redis


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (tests/run.sh installs it)")
class TestReplicatedSuppression(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.redis = RedisServer(self.dir).start()
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.opened = []

    @defer.inlineCallbacks
    def tearDown(self):
        for store, cluster in self.opened:
            store.close()
            yield cluster.stop()
        self.redis.stop()

    @defer.inlineCallbacks
    def node(self, name):
        cluster = RedisClusterState(self.clock, redis_connector(self.redis.url, timeout=2.0), node=name, timeout=2.0,
                                    heartbeat=1e6)  # fmt: skip
        yield cluster.start()
        store = ReplicatedSuppressionStore(os.path.join(self.dir, f"{name}.sqlite"), self.clock, cluster=cluster)
        self.opened.append((store, cluster))
        return store

    @defer.inlineCallbacks
    def test_a_suppression_added_on_one_node_is_refused_by_another(self):
        one = yield self.node("n1")
        three = yield self.node("n3")
        one.add("Bob@Example.test", "complaint", "complaint")
        yield one.sync()
        yield three.sync()
        entry = three.is_suppressed("bob@example.test")
        self.assertEqual((entry["source"], entry["reason"]), ("complaint", "complaint"))
        one.remove("bob@example.test")
        yield one.sync()
        yield three.sync()
        self.assertIsNone(three.is_suppressed("bob@example.test"))
        self.assertEqual(three.applied, 2)
        self.assertEqual(one.applied, 0)  # its own changes are not applied twice

    @defer.inlineCallbacks
    def test_changes_made_while_redis_is_away_are_pushed_when_it_returns(self):
        one = yield self.node("n1")
        two = yield self.node("n2")
        port = self.redis.port
        self.redis.stop()
        one.add("a@example.test", "hard bounce", "bounce")
        yield one.sync()
        self.assertIsNotNone(one.is_suppressed("a@example.test"))  # the local replica has it at once
        yield one.cluster.beat()  # the connection is found gone: local
        self.assertFalse(one.cluster.shared)
        self.assertEqual(one.pending_count(), 1)
        self.redis = RedisServer(self.dir, port).start()
        yield one.cluster.beat()
        yield two.cluster.beat()
        yield two.cluster.beat()
        self.assertTrue(one.cluster.shared and two.cluster.shared)
        yield one.sync()
        self.assertEqual(one.pending_count(), 0)
        yield two.sync()
        self.assertIsNotNone(two.is_suppressed("a@example.test"))

    @defer.inlineCallbacks
    def test_a_node_that_was_down_catches_up_from_its_position(self):
        one = yield self.node("n1")
        two = yield self.node("n2")
        one.add("early@example.test", "manual", "manual")
        yield one.sync()
        yield two.sync()
        two.close()  # node 2 goes down
        for i in range(3):
            one.add(f"late{i}@example.test", "manual", "manual")
        yield one.sync()
        again = ReplicatedSuppressionStore(os.path.join(self.dir, "n2.sqlite"), self.clock, cluster=two.cluster)
        self.opened.append((again, two.cluster))
        yield again.sync()
        self.assertEqual(again.applied, 3)  # only what it had not read
        self.assertTrue(all(again.is_suppressed(f"late{i}@example.test") for i in range(3)))
