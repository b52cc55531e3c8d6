#!/usr/bin/env python3
"""How long a pushback pause decided on one node takes to be applied on another: through the
records channel (nodes subscribed) against the heartbeat read alone (no subscription), in the
same run, against one redis-server on loopback started here and stopped by PID.

  .venv/bin/python bench/cluster_pause.py [ROUNDS] [HEARTBEAT_SECONDS]    (defaults 20, 2)

Prints the median and worst delay of each and their ratio (heartbeat / channel).
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile

from twisted.internet import defer, task

from pymta.outbound.shaping import Limits, Shaper
from pymta.state.cluster import RedisClusterState, redis_connector, redis_subscriber
from tests.redis_server import RedisServer

PUSHBACK = (421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail: rate limited")


@defer.inlineCallbacks
def delays(reactor, url: str, rounds: int, heartbeat: float, subscribe: bool):
    states = []
    for name in ("b1", "b2"):
        state = RedisClusterState(reactor, redis_connector(url, timeout=1.0), node=f"{name}{subscribe}", timeout=1.0,
                                  heartbeat=heartbeat, subscriber=redis_subscriber(url, timeout=1.0) if subscribe else None)  # fmt: skip
        yield state.start()
        states.append(state)
    for _ in range(100):  # at most 5 s to subscribe
        if not subscribe or all(s.subscription.subscribed for s in states):
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    one, two = (Shaper(reactor, Limits(), cluster=s) for s in states)
    out = []
    for i in range(rounds):
        key = f"provider:p{i}-{subscribe}"  # a fresh destination each round and run
        yield task.deferLater(reactor, random.uniform(0, heartbeat), lambda: None)  # any phase of the heartbeat
        start = reactor.seconds()
        one.observe(key, *PUSHBACK)
        for _ in range(int(heartbeat * 3 / 0.002) + 1):  # bounded: three heartbeats
            if two.state(key).paused_until > 0:
                break
            yield task.deferLater(reactor, 0.002, lambda: None)
        out.append(reactor.seconds() - start)
    for s in states:
        yield s.stop()
    return out


@defer.inlineCallbacks
def main(reactor, rounds: str = "20", heartbeat: str = "2"):
    with tempfile.TemporaryDirectory() as d:
        redis = RedisServer(d).start()
        try:
            channel = yield delays(reactor, redis.url, int(rounds), float(heartbeat), True)
            polled = yield delays(reactor, redis.url, int(rounds), float(heartbeat), False)
        finally:
            redis.stop()
    for name, values in (("channel", channel), ("heartbeat only", polled)):
        print(f"{name:15} median {statistics.median(values) * 1000:8.1f} ms  worst {max(values) * 1000:8.1f} ms")
    print(f"ratio heartbeat/channel (median): {statistics.median(polled) / max(1e-6, statistics.median(channel)):.0f}")


if __name__ == "__main__":
    sys.path.insert(0, ".")
    task.react(main, sys.argv[1:])
