"""The cluster state boundary: the same behaviour from ``local`` and from ``redis`` (a real
redis-server on loopback), shared between nodes, and a node that goes local with divided limits
when Redis is killed or stalls, and comes back by itself."""

from __future__ import annotations

import os
import signal

import pytest
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pymta.config import ConfigError, build_config
from pymta.interfaces import IClusterState
from pymta.rate import gcra_step, parse_rate
from pymta.state.cluster import (
    LocalClusterState,
    RedisClusterState,
    _quota_key,
    divided,
    make_cluster_state,
    redis_connector,
)
from tests.redis_server import RedisServer, have_redis

TRIPLE = ("192.0.2.0/24", "a@x.test", "b@y.test")


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    return clock


@defer.inlineCallbacks
def _seq(call, n):
    """``call(0)`` ... ``call(n - 1)``, one after the other: the list of their results."""
    results = []
    for i in range(n):
        results.append((yield call(i)))
    return results


class ClusterStateContract:
    """What every backend does for one node."""

    def make_state(self, clock):
        raise NotImplementedError

    def test_state_provides_the_interface(self):
        self.assertTrue(verifyObject(IClusterState, self.make_state(_clock())))

    @defer.inlineCallbacks
    def test_rates_allow_the_burst_then_the_steady_rate(self):
        clock = _clock()
        state = self.make_state(clock)
        yield state.start()
        rate = parse_rate("60/min, burst=3")
        waits = yield _seq(lambda _: state.take("messages", "k", rate), 4)
        self.assertEqual(waits[:3], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(waits[3], 1.0, places=6)
        self.assertEqual((yield state.take("messages", "other", rate)), 0.0)
        self.assertEqual((yield state.take("recipients", "k", rate)), 0.0)
        clock.advance(1.0)
        self.assertEqual((yield state.take("messages", "k", rate)), 0.0)
        self.assertGreater((yield state.take("messages", "k", rate)), 0)

    @defer.inlineCallbacks
    def test_rates_follow_the_local_gcra_step_by_step(self):
        clock = _clock()
        state = self.make_state(clock)
        yield state.start()
        rate = parse_rate("120/min, burst=2")
        tat = None
        for step in [0.0, 0.1, 0.1, 0.2, 0.6, 0.0, 1.3, 0.25, 0.25, 0.0]:
            clock.advance(step)
            new_tat, expected = gcra_step(tat, clock.seconds(), rate)
            got = yield state.take("m", "dest", rate)
            self.assertAlmostEqual(got, expected, places=6)
            if not expected:
                tat = new_tat

    @defer.inlineCallbacks
    def test_leases_hold_the_cap_and_are_given_back(self):
        clock = _clock()
        state = self.make_state(clock)
        yield state.start()
        got = yield _seq(lambda i: state.acquire_lease("dest", 2, f"c{i}", 30), 3)
        self.assertEqual(got, [True, True, False])
        self.assertTrue((yield state.acquire_lease("dest", 2, "c0", 30)))  # a lease it holds
        self.assertTrue((yield state.acquire_lease("other", 2, "c2", 30)))
        yield state.release_lease("dest", "c0")
        self.assertTrue((yield state.acquire_lease("dest", 2, "c2", 30)))

    @defer.inlineCallbacks
    def test_leases_lapse_unless_refreshed(self):
        clock = _clock()
        state = self.make_state(clock)
        yield state.start()
        self.assertTrue((yield state.acquire_lease("dest", 1, "a", 10)))
        clock.advance(8)
        yield state.refresh_leases([("dest", "a")], 10)
        clock.advance(8)
        self.assertFalse((yield state.acquire_lease("dest", 1, "b", 10)))  # refreshed: still held
        clock.advance(2.5)
        self.assertTrue((yield state.acquire_lease("dest", 1, "b", 10)))  # lapsed

    @defer.inlineCallbacks
    def test_greylisting_waits_the_delay_then_passes(self):
        clock = _clock()
        state = self.make_state(clock)
        yield state.start()
        self.assertEqual((yield state.greylist(TRIPLE, 300, 4 * 3600, 86400)), 300.0)
        clock.advance(100)
        self.assertAlmostEqual((yield state.greylist(TRIPLE, 300, 4 * 3600, 86400)), 200.0)
        clock.advance(200)
        self.assertEqual((yield state.greylist(TRIPLE, 300, 4 * 3600, 86400)), 0.0)
        clock.advance(80000)
        self.assertEqual((yield state.greylist(TRIPLE, 300, 4 * 3600, 86400)), 0.0)  # pass renewed


    @defer.inlineCallbacks
    def test_a_daily_quota_holds_its_cap_and_takes_back_what_was_not_used(self):
        state = self.make_state(_clock())
        yield state.start()
        counters = [("warmup:2026-12-02:ip1/gmail", 3), ("warmup:2026-12-02:ip1", -1)]
        got = yield _seq(lambda _: state.take_quota(counters), 4)
        self.assertEqual(got, [True, True, True, False])
        yield state.give_back_quota([k for k, _ in counters])
        self.assertTrue((yield state.take_quota(counters)))
        self.assertFalse((yield state.take_quota(counters)))
        # The uncapped total counted the three kept (four taken, one given back): a cap of 3 is full.
        self.assertFalse((yield state.take_quota([("warmup:2026-12-02:ip1", 3)])))
        self.assertTrue((yield state.take_quota([("warmup:2026-12-02:ip1", 4)])))
        self.assertTrue((yield state.take_quota([("warmup:2026-12-03:ip1/gmail", 3)])))  # another day


class TestLocalClusterState(ClusterStateContract, unittest.TestCase):
    def make_state(self, clock):
        return LocalClusterState(clock, "n1")


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (tests/run.sh installs it)")
class TestRedisClusterState(ClusterStateContract, unittest.TestCase):
    timeout = 60

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.redis = RedisServer(directory).start()
        self.states: list[RedisClusterState] = []

    @defer.inlineCallbacks
    def tearDown(self):
        for state in self.states:
            yield state.stop()
        self.redis.stop()

    def make_state(self, clock, node="n1", timeout=2.0):
        # Heartbeats are driven by the tests (beat()): none fires while the clock is advanced
        # with a call in flight, whose timeout would then run out on the test clock.
        state = RedisClusterState(clock, redis_connector(self.redis.url, timeout=timeout), node=node, timeout=timeout,
                                  heartbeat=1e6)  # fmt: skip
        self.states.append(state)
        return state

    @defer.inlineCallbacks
    def _nodes(self, clock, n=3):
        nodes = [self.make_state(clock, f"n{i + 1}") for i in range(n)]
        for node in nodes:
            yield node.start()
        for node in nodes:
            yield node.beat()
        return nodes

    @defer.inlineCallbacks
    def test_a_rate_is_shared_by_the_nodes(self):
        clock = _clock()
        a, b, c = yield self._nodes(clock)
        self.assertTrue(a.shared and b.shared and c.shared)
        rate = parse_rate("60/min")
        self.assertEqual((yield a.take("provider:big", "provider:big", rate)), 0.0)
        self.assertAlmostEqual((yield c.take("provider:big", "provider:big", rate)), 1.0, places=6)
        clock.advance(1.0)
        self.assertEqual((yield b.take("provider:big", "provider:big", rate)), 0.0)

    @defer.inlineCallbacks
    def test_a_local_prefix_keeps_a_rate_per_node(self):
        clock = _clock()
        a, b, _ = yield self._nodes(clock)
        rate = parse_rate("60/min")
        self.assertEqual((yield a.take("local:rate", "d", rate)), 0.0)
        self.assertEqual((yield b.take("local:rate", "d", rate)), 0.0)
        self.assertGreater((yield a.take("local:rate", "d", rate)), 0.0)

    @defer.inlineCallbacks
    def test_the_connection_cap_holds_across_nodes(self):
        clock = _clock()
        nodes = yield self._nodes(clock)
        got = []
        for i in range(3):
            for node in nodes:
                got.append((yield node.acquire_lease("mx:gmail", 3, f"c{i}", 30)))
        self.assertEqual(sum(got), 3)

    @defer.inlineCallbacks
    def test_leases_of_a_node_that_died_lapse_and_others_take_them(self):
        clock = _clock()
        a, b, _ = yield self._nodes(clock)
        for i in range(3):
            self.assertTrue((yield a.acquire_lease("mx:gmail", 3, f"c{i}", 15)))
        self.assertFalse((yield b.acquire_lease("mx:gmail", 3, "x", 15)))
        clock.advance(14)  # node a is gone: nothing refreshes its leases
        self.assertFalse((yield b.acquire_lease("mx:gmail", 3, "x", 15)))
        clock.advance(1.5)
        self.assertTrue((yield b.acquire_lease("mx:gmail", 3, "x", 15)))

    @defer.inlineCallbacks
    def test_a_greylisted_triple_passes_on_another_node(self):
        clock = _clock()
        a, b, _ = yield self._nodes(clock)
        self.assertEqual((yield a.greylist(TRIPLE, 60, 4 * 3600, 86400)), 60.0)
        clock.advance(61)
        self.assertEqual((yield b.greylist(TRIPLE, 60, 4 * 3600, 86400)), 0.0)

    @defer.inlineCallbacks
    def test_redis_killed_divides_the_limits_then_restarted_shares_them_again(self):
        clock = _clock()
        a, b, _c = yield self._nodes(clock)
        self.assertEqual(a.nodes_alive(), 3)
        rate = parse_rate("60/min, burst=3")
        self.redis.stop()
        # The first call after the kill answers from this node's share: 20/min, burst 3.
        waits = yield _seq(lambda _: a.take("d", "d", rate), 4)
        self.assertFalse(a.shared)
        self.assertEqual(a.switches, 1)
        self.assertEqual(waits[:3], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(waits[3], 3.0, places=6)
        caps = yield _seq(lambda i: a.acquire_lease("mx:x", 3, f"c{i}", 30), 2)
        self.assertEqual(caps, [True, False])  # 3 connections over 3 nodes: 1 here
        yield a.beat()  # a probe while Redis is away keeps it local, without another switch
        self.assertFalse(a.shared)
        self.assertEqual(a.switches, 1)
        self.redis.start()
        yield a.beat()
        self.assertTrue(a.shared)
        self.assertEqual(a.switches, 2)
        self.assertEqual((yield a.take("d2", "d2", parse_rate("60/min"))), 0.0)
        yield b.beat()  # b never noticed (it made no call): its connection is gone, it goes local, ...
        yield b.beat()  # ... and back
        self.assertTrue(b.shared)
        self.assertAlmostEqual((yield b.take("d2", "d2", parse_rate("60/min"))), 1.0, places=6)

    @defer.inlineCallbacks
    def test_a_warm_up_cap_holds_across_nodes(self):
        clock = _clock()
        nodes = yield self._nodes(clock)
        got = []
        for _ in range(5):
            for node in nodes:
                got.append((yield node.take_quota([("warmup:d:ip1", 10)])))
        self.assertEqual(sum(got), 10)

    @defer.inlineCallbacks
    def test_redis_away_divides_the_remaining_daily_quota_and_its_return_counts_what_was_sent(self):
        clock = _clock()
        a, b, _c = yield self._nodes(clock)
        cap = [("warmup:d:ip1", 100)]
        yield _seq(lambda _: b.take_quota(cap), 40)
        self.assertTrue((yield a.take_quota(cap)))  # node a saw 41 taken
        port = self.redis.port
        self.redis.stop()
        # 59 remain for 3 nodes alive: node a may send 19 more on its own.
        got = yield _seq(lambda _: a.take_quota(cap), 25)
        self.assertFalse(a.shared)
        self.assertEqual(sum(got), 19)
        self.assertEqual(got[:19], [True] * 19)
        self.redis = RedisServer(self.redis.directory, port).start()
        yield a.beat()
        self.assertTrue(a.shared)
        yield _seq(lambda _: b.beat(), 2)  # b finds its connection gone, then comes back
        self.assertTrue(b.shared)
        # Redis came back empty (no persistence): it counts what node a sent while it was away.
        self.assertEqual(int((yield a.command("GET", _quota_key("warmup:d:ip1")))), 19)

    @defer.inlineCallbacks
    def test_a_stalled_redis_times_out_to_the_local_answer(self):
        clock = _clock()
        state = self.make_state(clock, timeout=0.5)
        yield state.start()
        self.redis.send(signal.SIGSTOP)
        try:
            d = state.take("d", "d", parse_rate("60/min"))
            self.assertNoResult(d)
            clock.advance(0.5)  # the call's timeout, on the injected clock
            self.assertEqual(self.successResultOf(d), 0.0)
            self.assertFalse(state.shared)
        finally:
            self.redis.send(signal.SIGCONT)

    @defer.inlineCallbacks
    def test_no_redis_at_start_runs_local_and_joins_when_it_comes(self):
        clock = _clock()
        port = self.redis.port
        self.redis.stop()
        state = self.make_state(clock)
        yield state.start()
        self.assertFalse(state.shared)
        self.assertEqual((yield state.take("d", "d", parse_rate("60/min"))), 0.0)
        self.redis = RedisServer(self.redis.directory, port).start()
        yield state.beat()
        self.assertTrue(state.shared)


def test_divided_caps_keep_at_least_one():
    assert [divided(3, n) for n in (1, 2, 3, 4, 0)] == [3, 1, 1, 1, 3]


def test_cluster_config_defaults_to_local_and_checks_the_url():
    base = {"smtp": {"listen": ["tcp:2525"]}}
    config = build_config(base)
    assert config.cluster.backend == "local"
    assert isinstance(make_cluster_state(config, _clock()), LocalClusterState)
    redis = build_config({**base, "cluster": {"backend": "redis", "redis": "unix:/run/redis.sock", "node": "mta1"}})
    state = make_cluster_state(redis, _clock())
    assert isinstance(state, RedisClusterState)
    assert state.node == "mta1"
    with pytest.raises(ConfigError, match=r"^<config>: cluster.redis: expected redis://"):
        build_config({**base, "cluster": {"redis": "http://x"}})
    with pytest.raises(ConfigError, match=r"^<config>: cluster.backend: "):
        build_config({**base, "cluster": {"backend": "etcd"}})


def _granted(d):
    """A list that gets True once ``d`` has fired (its whole chain, leases included)."""
    out = []
    d.addCallback(lambda _: out.append(True))
    return out


def _shapers(clock, n=2, connections=3, rate="60/min"):
    from pymta.outbound.shaping import Limits, Shaper

    shared = LocalClusterState(clock, "cluster")  # one state object seen by every "node"
    limits = Limits(connections=connections, message_rate=parse_rate(rate))
    return [Shaper(clock, limits, cluster=shared, lease_ttl=9.0) for _ in range(n)], limits


def test_shapers_of_two_nodes_share_one_message_rate():
    clock = _clock()
    (a, b), limits = _shapers(clock)
    assert a.admit("mx:x", limits).result == 0.0
    assert b.admit("mx:x", limits).result == pytest.approx(clock.seconds() + 1.0)
    clock.advance(1.0)
    assert b.admit("mx:x", limits).result == 0.0


def test_shapers_of_two_nodes_never_exceed_the_shared_connection_cap():
    clock = _clock()
    (a, b), limits = _shapers(clock)
    for s in (a, b):
        s.state("mx:x").window = 3.0  # each node's own window would allow 3
    got = [_granted(s.acquire_connection("mx:x", limits)) for s in (a, a, b, b)]
    clock.advance(1.0)
    assert got == [[True], [True], [True], []]
    a.release_connection("mx:x")
    clock.advance(0.5)
    assert got[3] == [True]
    for s in (a, b):
        s.stop()


def test_leases_live_while_refreshed_and_lapse_when_their_node_dies():
    clock = _clock()
    (a, b), limits = _shapers(clock, connections=1)
    assert _granted(a.acquire_connection("mx:x", limits)) == [True]
    waiting = _granted(b.acquire_connection("mx:x", limits))
    for _ in range(40):  # 20 s: a keeps refreshing its lease (ttl 9 s)
        clock.advance(0.5)
    assert waiting == []
    a.stop()  # node a dies without releasing: nothing refreshes its lease any more
    for _ in range(20):
        clock.advance(0.5)
    assert waiting == [True]
    b.stop()


def test_greylisting_through_the_cluster_answers_450_then_passes():
    from pymta.inbound.limits import Greylist
    from pymta.state.cluster import ClusterInboundState

    clock = _clock()
    shared = LocalClusterState(clock, "cluster")
    one, other = (Greylist(clock, 60, 3600, 86400, state=ClusterInboundState(shared, clock)) for _ in range(2))
    reply = one.check("192.0.2.7", "a@x.test", "b@y.test").result
    assert (reply.code, reply.enhanced) == (450, "4.7.1")
    clock.advance(61)
    assert other.check("192.0.2.9", "A@x.test", "b@y.test").result is None  # same /24, same triple
