"""Records every node of a cluster applies (a real redis-server on loopback): pushback pauses and
reduced rates, operator suspensions; and every switch between the shared state and the local
fallback as a structured log event and a Prometheus metric."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from pymta.admin.http.metrics import Metrics
from pymta.outbound.pools import Pool, Source, SourceSelector, WarmupCounter
from pymta.outbound.shaping import Limits, Shaper
from pymta.rate import parse_rate
from pymta.state.cluster import LocalClusterState, RedisClusterState, redis_connector
from pymta.state.suspensions import SQLiteSuspensions
from tests.redis_server import RedisServer, RedisTestCase, have_redis

PUSHBACK = (421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail: rate limited")


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (tests/run.sh installs it)")
class TestSharedRecords(RedisTestCase):
    timeout = 60

    def setUp(self):
        super().setUp()
        self.clock = _clock()

    @defer.inlineCallbacks
    def node(self, name):
        # Heartbeats are driven by the tests (beat()), as in tests/test_cluster_state.py.
        state = RedisClusterState(self.clock, redis_connector(self.redis.url, timeout=2.0), node=name, timeout=2.0,
                                  heartbeat=1e6)  # fmt: skip
        self.states.append(state)
        yield state.start()
        return state

    @defer.inlineCallbacks
    def test_a_record_reaches_every_watching_node_until_it_lapses(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        seen = []
        b.watch("things", seen.append)
        self.assertTrue((yield a.put_record("things", "x", {"v": 1}, self.clock.seconds() + 10)))
        yield b.beat()
        self.assertEqual(seen[-1], {"x": {"v": 1, "until": self.clock.seconds() + 10}})
        self.clock.advance(11)
        yield b.beat()
        self.assertEqual(seen[-1], {})
        self.assertEqual((yield a.command("HLEN", "pymta:things")), 0)  # the lapsed record was swept

    @defer.inlineCallbacks
    def test_pushback_on_one_node_pauses_the_destination_on_every_node(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one, two = Shaper(self.clock, Limits(), cluster=a), Shaper(self.clock, Limits(), cluster=b)
        limits = Limits(message_rate=parse_rate("60/min"))
        self.assertTrue(one.observe("provider:big", *PUSHBACK))
        self.assertEqual((yield two.admit("provider:big", limits)), 0.0)  # not yet read by node 2
        yield b.beat()
        paused = one.state("provider:big").paused_until
        self.assertEqual(two.state("provider:big").paused_until, paused)
        self.assertEqual((yield two.admit("provider:big", limits)), paused)
        self.assertIn("rate limited", two.explain("provider:big")["reason"])
        # A node that starts later picks the pause up when it joins ...
        c = yield self.node("n3")
        three = Shaper(self.clock, Limits(), cluster=c)
        self.assertEqual(three.state("provider:big").paused_until, 0.0)
        yield c.beat()
        self.assertEqual(three.state("provider:big").paused_until, paused)
        # ... and after the pause, every node resumes at the reduced share of the rate.
        self.clock.advance(paused - self.clock.seconds())
        self.assertEqual(two.current_rate("provider:big", limits), one.current_rate("provider:big", limits))
        self.assertLess(two.current_rate("provider:big", limits).interval, 2.1)
        self.assertGreater(two.current_rate("provider:big", limits).interval, 1.9)  # half of 60/min

    @defer.inlineCallbacks
    def test_an_operator_resume_on_one_node_lifts_the_pause_everywhere(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one, two = Shaper(self.clock, Limits(), cluster=a), Shaper(self.clock, Limits(), cluster=b)
        one.observe("provider:big", *PUSHBACK)
        yield b.beat()
        self.assertGreater(two.state("provider:big").paused_until, self.clock.seconds())
        two.resume(["provider:big"])
        yield a.beat()
        yield b.beat()
        self.assertEqual(one.state("provider:big").paused_until, 0.0)
        self.assertEqual(one.state("provider:big").share, 1.0)
        self.assertEqual(two.state("provider:big").paused_until, 0.0)

    @defer.inlineCallbacks
    def test_a_suspension_made_on_one_node_holds_on_every_node_and_its_lifting_too(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one = SQLiteSuspensions(os.path.join(self.dir, "s1.sqlite"), self.clock, cluster=a)
        two = SQLiteSuspensions(os.path.join(self.dir, "s2.sqlite"), self.clock, cluster=b)
        self.closing += [one.close, two.close]
        row = one.add("domain", "Example.COM", 3600, "abuse desk asked")
        yield b.beat()
        self.assertEqual(two.match(domain="example.com")["id"], row["id"])
        self.assertEqual(two.in_force(), one.in_force())
        # It survives a restart of node 2 (its SQLite) ...
        two.close()
        two = SQLiteSuspensions(os.path.join(self.dir, "s2.sqlite"), self.clock, cluster=b)
        self.closing.append(two.close)
        self.assertIsNotNone(two.match(domain="example.com"))
        # ... and lifted on node 1 it is lifted on node 2.
        one.remove(row["id"])
        yield b.beat()
        self.assertIsNone(two.match(domain="example.com"))
        self.assertEqual(two.in_force(), [])

    @defer.inlineCallbacks
    def test_a_suspension_made_while_redis_is_away_is_published_when_it_returns(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one = SQLiteSuspensions(os.path.join(self.dir, "s1.sqlite"), self.clock, cluster=a)
        two = SQLiteSuspensions(os.path.join(self.dir, "s2.sqlite"), self.clock, cluster=b)
        self.closing += [one.close, two.close]
        port = self.redis.port
        self.redis.stop()
        yield a.beat()
        self.assertFalse(a.shared)
        row = one.add("provider", "gmail", 600, "warming up slowly")
        self.assertIsNotNone(one.match(provider="gmail"))  # in force here at once
        self.redis = RedisServer(self.dir, port).start()
        yield a.beat()  # back: node 1 publishes what it made meanwhile ...
        self.assertTrue(a.shared)
        yield b.beat()
        yield b.beat()
        self.assertTrue(b.shared)
        self.assertEqual(two.match(provider="gmail")["id"], row["id"])  # ... and node 2 applies it

    @defer.inlineCallbacks
    def test_the_ladder_step_judged_on_one_node_holds_on_every_node(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        today = datetime.fromtimestamp(self.clock.seconds(), UTC).date()

        def selector(name, cluster):
            counter = WarmupCounter(os.path.join(self.dir, f"{name}.sqlite"))
            self.closing.append(counter.close)
            source = Source("ip1", "127.0.0.2", "mta.test", (100, 200, 400), today - timedelta(days=2))
            return source, SourceSelector(self.clock, {"bulk": Pool("bulk", [(source, 1)])}, default_pool="bulk",
                                          counter=counter, cluster=cluster)  # fmt: skip

        source, one = selector("w1", a)
        _, two = selector("w2", b)
        one.counter.outcome("ip1", today - timedelta(days=1), "bounced", 30)  # node 1 saw yesterday's bounces
        self.assertEqual(one.offset(source, today), 2)  # two steps back: today's cap is day 1's
        self.assertEqual(source.cap(today, 2), 100)
        yield b.beat()
        self.assertEqual(two.counter.ladder("ip1"), (2, today.isoformat()))
        self.assertEqual(two.offset(source, today), 2)  # judged once for the day, by the cluster

    @defer.inlineCallbacks
    def test_every_switch_is_a_log_event_and_a_metric(self):
        metrics = Metrics()
        events = []

        def observe(event):
            if event.get("log_namespace") == "pymta.state.cluster":
                events.append(event)
            metrics.observe(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def count(state):
            return metrics.registry.get_sample_value("pymta_cluster_state_changes_total", {"state": state}) or 0.0

        a = yield self.node("n1")
        self.assertEqual((count("shared"), count("local")), (1.0, 0.0))
        port = self.redis.port
        self.redis.stop()
        yield a.take("d", "d", parse_rate("60/min"))
        self.assertFalse(a.shared)
        self.assertEqual((count("shared"), count("local")), (1.0, 1.0))
        yield a.beat()  # still away: no new switch
        self.assertEqual(count("local"), 1.0)
        self.redis = RedisServer(self.dir, port).start()
        yield a.beat()
        self.assertTrue(a.shared)
        self.assertEqual((count("shared"), count("local")), (2.0, 1.0))
        kinds = [e["event"] for e in events if e.get("event") in ("cluster_shared", "cluster_fallback")]
        self.assertEqual(kinds, ["cluster_shared", "cluster_fallback", "cluster_shared"])
        fallback = next(e for e in events if e.get("event") == "cluster_fallback")
        self.assertEqual((fallback["node"], fallback["alive"]), ("n1", 1))
        self.assertTrue(re.search(r"connection|closed|lost|refused", fallback["why"], re.I), fallback["why"])


def test_a_node_alone_has_no_records_to_share():
    state = LocalClusterState(_clock(), "n1")
    shaper = Shaper(state.clock, Limits(), cluster=state)
    assert shaper.observe("provider:big", *PUSHBACK)
    assert shaper.state("provider:big").paused_until > state.clock.seconds()
    d = state.put_record("pauses", "x", {}, 1e12)
    assert d.result is False
