"""Record changes published on a Redis channel (a real redis-server on loopback): a pause,
resume or suspension made on one node is applied on the others at once, not at their next
heartbeat; the subscription comes back after Redis restarts; a pause or resume decided while
Redis was away reaches the other nodes when it returns."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
from twisted.internet import defer, reactor, task

from pymta.outbound.shaping import Limits, Shaper
from pymta.state.channel import Subscription
from pymta.state.cluster import RedisClusterState, redis_connector, redis_subscriber
from pymta.state.suspensions import SQLiteSuspensions
from tests.redis_server import RedisServer, RedisTestCase, have_redis

PUSHBACK = (421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail: rate limited")
HEARTBEAT = 60.0  # far longer than any wait below: only the channel can bring a change in time
WAIT = 5.0  # seconds a published change may take to be applied on another node


@defer.inlineCallbacks
def eventually(predicate, seconds: float, what: str):
    """Poll ``predicate`` every 50 ms on the reactor for at most ``seconds``; the elapsed time."""
    start = reactor.seconds()
    for _ in range(int(seconds / 0.05) + 1):
        if predicate():
            return reactor.seconds() - start
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"not within {seconds}s: {what}")


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (tests/run.sh installs it)")
class TestRecordChannel(RedisTestCase):
    @defer.inlineCallbacks
    def node(self, name):
        url = self.redis.url
        state = RedisClusterState(reactor, redis_connector(url, timeout=1.0), node=name, timeout=1.0,
                                  heartbeat=HEARTBEAT, subscriber=redis_subscriber(url, timeout=1.0))  # fmt: skip
        self.states.append(state)
        yield state.start()
        yield eventually(lambda: state.subscription.subscribed, WAIT, f"{name} subscribed")
        return state

    @defer.inlineCallbacks
    def test_a_change_made_by_a_tool_speaking_for_the_node_reaches_the_node_itself(self):
        a = yield self.node("n1")
        seen = []
        a.watch("things", seen.append)
        tool = RedisClusterState(reactor, redis_connector(self.redis.url, timeout=1.0), node="n1", timeout=1.0,
                                 heartbeat=HEARTBEAT, member=False)  # fmt: skip
        self.states.append(tool)
        yield tool.start()
        self.assertTrue((yield tool.put_record("things", "x", {"v": 1}, reactor.seconds() + 600)))
        yield eventually(lambda: seen and "x" in seen[-1], WAIT, "n1 reads the table the tool changed")
        self.assertEqual(seen[-1]["x"]["v"], 1)
        self.assertTrue((yield tool.delete_record("things", "x")))
        yield eventually(lambda: seen[-1] == {}, WAIT, "n1 reads the deletion")

    def restart_redis(self):
        port = self.redis.port
        self.redis.stop()
        return port

    @defer.inlineCallbacks
    def test_a_pause_and_its_resume_reach_the_other_node_long_before_its_heartbeat(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one, two = Shaper(reactor, Limits(), cluster=a), Shaper(reactor, Limits(), cluster=b)
        self.assertTrue(one.observe("provider:big", *PUSHBACK))
        paused = one.state("provider:big").paused_until
        yield eventually(lambda: two.state("provider:big").paused_until == paused, WAIT, "pause applied on n2")
        self.assertIn("rate limited", two.explain("provider:big")["reason"])
        self.assertEqual(two.state("provider:big").share, one.state("provider:big").share)
        two.resume(["provider:big"])
        yield eventually(lambda: one.state("provider:big").paused_until == 0.0, WAIT, "resume applied on n1")
        self.assertEqual(one.state("provider:big").share, 1.0)

    @defer.inlineCallbacks
    def test_a_suspension_and_its_lifting_reach_the_other_node_at_once(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one = SQLiteSuspensions(os.path.join(self.dir, "s1.sqlite"), reactor, cluster=a)
        two = SQLiteSuspensions(os.path.join(self.dir, "s2.sqlite"), reactor, cluster=b)
        self.closing += [one.close, two.close]
        row = one.add("domain", "example.com", 3600, "abuse desk asked")
        yield eventually(lambda: two.match(domain="example.com") is not None, WAIT, "suspension on n2")
        self.assertEqual(two.match(domain="example.com")["id"], row["id"])
        one.remove(row["id"])
        yield eventually(lambda: two.match(domain="example.com") is None, WAIT, "lifting on n2")

    @defer.inlineCallbacks
    def test_the_subscription_comes_back_after_redis_restarts_and_carries_changes_again(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one, two = Shaper(reactor, Limits(), cluster=a), Shaper(reactor, Limits(), cluster=b)
        port = self.restart_redis()
        yield eventually(lambda: not b.subscription.subscribed, WAIT, "n2 sees the subscription lost")
        self.assertEqual(b.subscription.subscriptions, 1)
        self.redis = RedisServer(self.dir, port).start()
        for state in (a, b):  # the backoff after a short outage is a few seconds at most
            yield eventually(lambda s=state: s.subscription.subscribed and s.shared, 15, f"{state.node} back")
        self.assertEqual(b.subscription.subscriptions, 2)
        one.observe("provider:big", *PUSHBACK)
        paused = one.state("provider:big").paused_until
        yield eventually(lambda: two.state("provider:big").paused_until == paused, WAIT, "pause applied on n2")

    @defer.inlineCallbacks
    def test_a_pause_decided_while_redis_is_away_reaches_the_other_node_when_it_returns(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one, two = Shaper(reactor, Limits(), cluster=a), Shaper(reactor, Limits(), cluster=b)
        port = self.restart_redis()
        yield eventually(lambda: not a.subscription.subscribed, WAIT, "n1 sees Redis gone")
        self.assertTrue(one.observe("provider:big", *PUSHBACK))  # decided here alone ...
        paused = one.state("provider:big").paused_until
        self.assertGreater(paused, reactor.seconds())
        yield eventually(lambda: not a.shared, WAIT, "n1 local")
        self.assertEqual(two.state("provider:big").paused_until, 0.0)
        self.redis = RedisServer(self.dir, port).start()  # ... published once Redis is back
        yield eventually(lambda: two.state("provider:big").paused_until == paused, 20, "pause applied on n2")
        self.assertEqual((yield a.command("HLEN", "pymta:pauses")), 1)
        self.assertIn("rate limited", two.explain("provider:big")["reason"])


    @defer.inlineCallbacks
    def test_a_resume_made_while_redis_is_away_lifts_the_pause_on_the_other_node_when_it_returns(self):
        a = yield self.node("n1")
        b = yield self.node("n2")
        one, two = Shaper(reactor, Limits(), cluster=a), Shaper(reactor, Limits(), cluster=b)
        one.observe("provider:big", *PUSHBACK)
        yield eventually(lambda: two.state("provider:big").paused_until > 0, WAIT, "pause applied on n2")
        # Redis stops answering but keeps its data (a restarted redis-server here would come back empty).
        self.redis.send(signal.SIGSTOP)
        yield b.beat()  # times out: n2 goes local
        self.assertFalse(b.shared)
        self.assertEqual(two.resume(["provider:big"]), ["provider:big"])  # lifted here alone ...
        self.redis.send(signal.SIGCONT)
        yield b.beat()  # ... and everywhere once n2 is back
        self.assertTrue(b.shared)
        yield eventually(lambda: one.state("provider:big").paused_until == 0.0, WAIT, "pause lifted on n1")
        self.assertEqual(one.state("provider:big").share, 1.0)
        self.assertEqual(two.state("provider:big").paused_until, 0.0)  # not taken back from the cluster
        self.assertEqual((yield b.command("HLEN", "pymta:pauses")), 0)


def test_reconnection_delays_double_up_to_a_bound_and_never_raise():
    clock = task.Clock()
    opened = []

    def refuse(on_message, on_lost):
        opened.append(clock.seconds())
        return defer.fail(ConnectionRefusedError("refused"))

    ready = []
    sub = Subscription(clock, refuse, "pymta:records", lambda c, m: None, lambda: ready.append(1), initial=0.5,
                       most=4.0)  # fmt: skip
    sub.start()
    for _ in range(8):
        clock.advance(sub.delay())
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(opened)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert not sub.subscribed
    assert ready == []
    sub.stop()
    clock.advance(60)
    assert len(opened) == 9  # stopped: no attempt after
    assert clock.getDelayedCalls() == []


def test_a_subscription_lost_is_made_again_and_then_catches_up():
    clock = task.Clock()
    lost_callbacks, ready = [], []

    class Conn:
        def subscribe(self, channel):
            return defer.succeed([b"subscribe", channel.encode(), 1])

        def disconnect(self):
            return defer.succeed(None)

    def accept(on_message, on_lost):
        lost_callbacks.append(on_lost)
        return defer.succeed(Conn())

    sub = Subscription(clock, accept, "pymta:records", lambda c, m: None, lambda: ready.append(clock.seconds()))
    sub.start()
    assert sub.subscribed
    assert ready == [0.0]
    lost_callbacks[-1]()
    assert not sub.subscribed
    clock.advance(sub.delay())
    assert sub.subscribed
    assert sub.subscriptions == 2
    assert ready == [0.0, 0.5]
