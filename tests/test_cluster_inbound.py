"""The cluster's inbound state (per-client connection counts, rates and greylisting behind
:class:`pymta.interfaces.IInboundState`) passes the same contract as the node's SQLite and
in-process backends: on a node alone, and on a real redis-server on loopback, where a second
handle is another listener process of the node. Its answers are Deferreds: the synchronous
contract runs in a thread and waits for each answer from the reactor's thread."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from pymta.inbound.limits import ClientLimits
from pymta.rate import parse_rate
from pymta.state.cluster import ClusterInboundState, LocalClusterState, RedisClusterState, redis_connector
from tests.contract_inbound_state import InboundStateContract, SharedInboundStateContract
from tests.fakes import Answered, fired
from tests.redis_server import RedisServer, have_redis


class TestClusterInboundStateAlone(InboundStateContract):
    def make_state(self, clock):
        return Answered(ClusterInboundState(LocalClusterState(clock, "n1"), clock), lambda f, *a: fired(f(*a)))


def from_thread(f, *args):
    """``f(*args)`` called in the reactor's thread; its (Deferred's) value, from the contract's thread."""
    return threads.blockingCallFromThread(reactor, f, *args)


class ThreadClock:
    """The test clock as the contract's thread sees it: advanced in the reactor's thread."""

    def __init__(self, clock):
        self.clock = clock

    def seconds(self):
        return self.clock.seconds()

    def advance(self, seconds):
        from_thread(self.clock.advance, seconds)


class _OnRedis:
    """The contract's hooks, for a run in a thread beside the reactor."""

    def __init__(self, case):
        self.case = case

    def make_state(self, clock):
        return Answered(from_thread(self.case.handle, clock.clock, "n1", 101), from_thread)

    def other_process(self, clock):
        return Answered(from_thread(self.case.handle, clock.clock, "n1", 102), from_thread)


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (tests/run.sh installs it)")
class TestClusterInboundStateOnRedis(unittest.TestCase):
    timeout = 60

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.redis = RedisServer(directory).start()
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.nodes: list[RedisClusterState] = []
        self.states: list[ClusterInboundState] = []

    @defer.inlineCallbacks
    def tearDown(self):
        for state in self.states:
            state.close()
        for node in self.nodes:
            yield node.stop()
        self.redis.stop()

    @defer.inlineCallbacks
    def handle(self, clock, node_name, owner):
        node = RedisClusterState(clock, redis_connector(self.redis.url, timeout=2.0), node=node_name, timeout=2.0,
                                 heartbeat=1e6)  # fmt: skip
        self.nodes.append(node)
        yield node.start()
        self.assertTrue(node.shared)
        state = ClusterInboundState(node, clock, lease_ttl=30.0, owner=owner)
        self.states.append(state)
        return state

    def contract(self, name):
        test = getattr(SharedInboundStateContract, name)
        return threads.deferToThread(test, _OnRedis(self), ThreadClock(self.clock))

    @defer.inlineCallbacks
    def test_another_node_shares_the_client_limits(self):
        one = yield self.handle(self.clock, "n1", 101)
        two = yield self.handle(self.clock, "n2", 101)
        self.assertTrue((yield one.acquire_connection("192.0.2.1/32", 2)))
        self.assertTrue((yield two.acquire_connection("192.0.2.1/32", 2)))
        self.assertFalse((yield two.acquire_connection("192.0.2.1/32", 2)))
        self.assertEqual((yield one.take("messages", "192.0.2.1/32", parse_rate("1/min"))), 0.0)
        self.assertGreater((yield two.take("messages", "192.0.2.1/32", parse_rate("1/min"))), 0)

    @defer.inlineCallbacks
    def test_the_slots_of_a_node_that_died_lapse_after_the_lease_time(self):
        one = yield self.handle(self.clock, "n1", 101)
        two = yield self.handle(self.clock, "n2", 101)
        self.assertTrue((yield two.acquire_connection("k", 1)))
        self.assertFalse((yield one.acquire_connection("k", 1)))
        two.close()  # node 2 is gone: nothing refreshes its lease
        self.clock.advance(31)
        self.assertTrue((yield one.acquire_connection("k", 1)))

    @defer.inlineCallbacks
    def test_client_limits_refuse_the_connection_over_the_cluster_cap(self):
        a = ClientLimits(self.clock, connections_per_client=1, state=(yield self.handle(self.clock, "n1", 101)))
        b = ClientLimits(self.clock, connections_per_client=1, state=(yield self.handle(self.clock, "n2", 101)))
        self.assertIsNone((yield a.connected("192.0.2.5")))
        self.assertEqual((yield b.connected("192.0.2.5")).code, 421)
        yield a.disconnected("192.0.2.5")
        self.assertIsNone((yield b.connected("192.0.2.5")))


for _name in dir(SharedInboundStateContract):
    if _name.startswith("test_"):
        setattr(TestClusterInboundStateOnRedis, _name, lambda self, n=_name: self.contract(n))
