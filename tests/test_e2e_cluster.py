"""Three ``twistd -n pymta`` nodes sharing one Debian redis-server on loopback, each with its own
state directory, port and source address (127.0.0.2-4), relaying to one scripted receiver that
counts what the cluster does: a shared message rate, a shared connection cap, Redis killed and
restarted in the middle of a run, a node killed with SIGKILL."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from tests.mta_process import MTAProcess, wait_until
from tests.redis_server import RedisServer, have_redis
from tests.smtp_receiver import ScriptedReceiver

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (tests/run.sh installs it)"),
]


class CountingReceiver(ScriptedReceiver):
    """Answers every end of data after ``delay`` seconds, and notes when each 250 went out, from
    which address, and (in ``transactions_open``, ``most_transactions_open``) the transactions
    open at once. Every wait and loop is bounded."""

    accept_for = 300.0
    name = b"count.test"
    ehlo_keywords = (b"PIPELINING",)

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.accepted: list[tuple[float, str]] = []  # (monotonic time of the 250, peer address)
        self.mails: list[tuple[float, str]] = []  # (monotonic time of MAIL, peer address)
        super().__init__()

    def on_mail(self, sender: str, peer: str) -> bytes:
        with self.lock:
            self.mails.append((time.monotonic(), peer))
        return b"250 ok"

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        time.sleep(self.delay)  # bounded: the receiver's fixed answer delay
        return b"250 accepted"

    def on_answered(self, recipients: list[str], message: bytes, peer: str) -> None:
        with self.lock:
            self.accepted.append((time.monotonic(), peer))

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)


def send(port: int, count: int, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for i in range(count):
            client.sendmail("s@example.org", ["r@remote.test"], f"Subject: {tag}-{i}\r\n\r\nbody\r\n")


@pytest.fixture
def cluster(tmp_path):
    """``make(shaping, receiver)`` starts Redis and three nodes; all stopped at the end."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = RedisServer(str(redis_dir)).start()
    nodes: list[MTAProcess] = []
    receivers: list[CountingReceiver] = []

    def make(shaping: str, receiver: CountingReceiver, lease_ttl: str = "30s") -> list[MTAProcess]:
        receivers.append(receiver)
        for i in range(3):
            work = tmp_path / f"node{i + 1}"
            work.mkdir()
            config = (f'source_address = "127.0.0.{i + 2}"\n'
                      f'[queue]\nretry_initial = "1s"\nretry_max = "2s"\n'
                      f'[routes]\n"remote.test" = "127.0.0.1:{receiver.port}"\n'
                      f'[cluster]\nbackend = "redis"\nredis = "{redis.url}"\nnode = "node{i + 1}"\n'
                      f'timeout = "0.5s"\nheartbeat = "0.5s"\nlease_ttl = "{lease_ttl}"\n'
                      + shaping.replace("{address}", f"127.0.0.{i + 2}"))  # fmt: skip
            nodes.append(MTAProcess(str(work), extra_config=config).start())
        return nodes

    yield make, redis
    for node in nodes:
        node.stop(signal.SIGKILL, seconds=5)
    for receiver in receivers:
        receiver.stop()
    redis.stop()


def test_a_shared_rate_of_60_a_minute_holds_for_the_cluster_within_5_percent(cluster):
    make, _ = cluster
    receiver = CountingReceiver()
    nodes = make('[shaping.default]\nmessage_rate = "60/min"\n', receiver)
    for node in nodes:
        send(node.port, 15, node.workdir)
    wait_until(lambda: receiver.count() >= 1, 30, "a first delivery")
    window = 20.0
    start = receiver.accepted[0][0]
    wait_until(lambda: time.monotonic() > start + window + 0.5, window + 5, "the end of the counted window")
    with receiver.lock:
        in_window = [t for t, _ in receiver.accepted if t <= start + window]
        peers = {p for _, p in receiver.accepted}
    # 60/min from the first message on: 1 + 20 in 20 s. Three nodes with their own limiters would send 3 times that.
    assert 21 * 0.95 <= len(in_window) <= 21 * 1.05, len(in_window)
    assert peers == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}  # every node sent its share


def test_a_shared_cap_of_3_connections_is_never_exceeded(cluster):
    make, _ = cluster
    receiver = CountingReceiver(delay=0.3)
    nodes = make("[shaping.default]\nconnections = 3\n", receiver, lease_ttl="3s")
    for node in nodes:
        send(node.port, 12, node.workdir)
    wait_until(lambda: receiver.count() >= 36, 90, "every message delivered")
    assert 2 <= receiver.most_transactions_open <= 3  # three nodes with a window of 2 each would reach 6


def test_a_node_killed_with_sigkill_frees_its_connection_slots_when_its_leases_lapse(cluster):
    make, _ = cluster
    receiver = CountingReceiver(delay=25.0)  # every delivery holds its slot for 25 s
    nodes = make("[shaping.default]\nconnections = 3\n", receiver, lease_ttl="3s")
    send(nodes[0].port, 2, "first")  # node 1 takes two of the three slots (its window starts at 2)
    wait_until(lambda: receiver.transactions_open == 2, 30, "node 1's two transactions")
    send(nodes[1].port, 2, "second")  # node 2 gets the third slot; its second message waits
    wait_until(lambda: receiver.transactions_open == 3, 30, "node 2's first transaction")
    nodes[0].stop(signal.SIGKILL, seconds=5)
    killed_at = time.monotonic()

    def second_of_node_2():
        with receiver.lock:
            return [t for t, peer in receiver.mails if peer == "127.0.0.3"][1:]

    # Node 1's leases stay in Redis until they lapse (3 s after their last refresh, which is at
    # most 1 s old): only then does node 2 take a slot node 1 held.
    opened = wait_until(second_of_node_2, 20, "node 2 using a slot node 1 held")
    assert opened[0] - killed_at >= 1.9


def test_redis_killed_mid_run_divides_the_limits_and_restarted_shares_them_again(cluster):
    make, redis = cluster
    receiver = CountingReceiver()
    nodes = make('[shaping.default]\nmessage_rate = "60/min"\n', receiver)
    for node in nodes:
        send(node.port, 12, node.workdir)
    wait_until(lambda: receiver.count() >= 3, 30, "deliveries through the shared rate")
    port = redis.port
    redis.stop()
    killed_at = time.monotonic()
    for node in nodes:
        wait_until(lambda n=node: any(e.get("event") == "cluster_fallback" for e in n.log_events()), 10,
                   "a node going local")  # fmt: skip
    # Local limits of 60/min over 3 nodes: 20/min each (60/min for the cluster); each keeps sending.
    wait_until(lambda: time.monotonic() > killed_at + 13.5, 20, "ten seconds of local limits")
    with receiver.lock:
        during = [p for t, p in receiver.accepted if killed_at + 3.5 <= t <= killed_at + 13.5]
    per_node = {p: during.count(p) for p in set(during)}
    assert len(per_node) == 3, per_node
    assert all(count <= 10 / 3 + 1 for count in per_node.values()), per_node
    restarted = RedisServer(redis.directory, port).start()
    try:
        def all_shared_again():
            return all(sum(e.get("event") == "cluster_shared" for e in n.log_events()) >= 2 for n in nodes)

        wait_until(all_shared_again, 15, "every node back on the shared state")  # once at start, once now
        before = receiver.count()
        wait_until(lambda: receiver.count() >= before + 3, 20, "deliveries through the shared rate again")
    finally:
        restarted.stop()


def suppress(node: MTAProcess, *args: str) -> subprocess.CompletedProcess:
    """``pymta-suppress`` against ``node``'s configuration, as an operator runs it."""
    return subprocess.run([sys.executable, "-c", "import sys; from pymta.admin.cli import suppress_main; "
                           "sys.exit(suppress_main())", "--config", node.config_path, *args],
                          capture_output=True, text=True, timeout=30, cwd=node.workdir)  # fmt: skip


def rcpt_reply(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("s@example.org")
        code, _ = client.rcpt(address)
        return code


def refused_within(port: int, address: str, seconds: float) -> float | None:
    """Seconds until RCPT TO ``address`` gets 550 (asked every 50 ms), or None past ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if rcpt_reply(port, address) == 550:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_a_suppression_added_with_the_command_on_node_1_is_refused_at_rcpt_on_node_3_within_a_second(cluster):
    make, redis = cluster
    receiver = CountingReceiver()
    nodes = make("", receiver)
    assert rcpt_reply(nodes[2].port, "gone@remote.test") == 250
    done = suppress(nodes[0], "add", "gone@remote.test", "--reason", "asked to leave")
    assert done.returncode == 0, done.stderr
    took = refused_within(nodes[2].port, "gone@remote.test", 1.0)
    assert took is not None, "node 3 still accepts the address 1 s after pymta-suppress on node 1"
    # Added while Redis is away, it waits in node 1's outbox; node 1 sends it when Redis is back.
    port = redis.port
    redis.stop()
    done = suppress(nodes[0], "add", "later@remote.test")
    assert done.returncode == 0, done.stderr
    assert "Redis does not answer: 1 change(s) wait" in done.stderr, done.stderr
    restarted = RedisServer(redis.directory, port).start()
    try:
        wait_until(lambda: all(sum(e.get("event") == "cluster_shared" for e in n.log_events()) >= 2 for n in nodes),
                   15, "every node back on the shared state")  # fmt: skip
        assert refused_within(nodes[2].port, "later@remote.test", 5.0) is not None
        assert refused_within(nodes[1].port, "later@remote.test", 5.0) is not None  # each node syncs on its own
    finally:
        restarted.stop()


def test_a_warm_up_cap_of_100_a_day_holds_across_the_three_nodes(cluster):
    import datetime

    make, _ = cluster
    receiver = CountingReceiver()
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    # One source named ip1 on every node (each node sends from its own loopback address).
    nodes = make(f'[sources.ip1]\naddress = "{{address}}"\nwarmup = [100, 200]\nwarmup_start = "{today}"\n'
                 '[pools.bulk]\nsources = { ip1 = 1 }\n[pool_select]\ndefault = "bulk"\n', receiver)  # fmt: skip
    for node in nodes:
        send(node.port, 40, node.workdir)
    wait_until(lambda: receiver.count() >= 100, 60, "the day's 100 messages")

    def held():
        return sum(len(n.queue_files("deferred")) for n in nodes)

    wait_until(lambda: held() >= 20, 30, "the other 20 held until tomorrow")
    assert receiver.count() == 100
    with receiver.lock:
        peers = {p for _, p in receiver.accepted}
    assert peers == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}  # every node used its part of the cap
    assert held() == 20, held()
