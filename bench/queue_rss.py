#!/usr/bin/env python3
"""RSS of ``twistd pymta`` against the size of its queue: is memory the queue or a leak?

For each N, a state directory is filled with N queued relay messages (written through the queue
store, no fsync) whose destination refuses connections, and the MTA (``[smtp] processes = 2``,
retries an hour apart) is started on it: RSS of the main process once every message has been
tried and deferred, then again after a SIGTERM restart (the recovery of N deferred messages).
Prints a Markdown table and the cost per queued message (least squares over N).

    bench/queue_rss.py [N ...]        (default: 0 10000 40000)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soak import MTA, free_port, rss_kb, slope


def fill(queue_dir: str, n: int) -> None:
    """In a child process of its own (``task.react`` ends the process it runs in)."""
    subprocess.run([sys.executable, os.path.abspath(__file__), "--fill", queue_dir, str(n)], check=True, timeout=1800)


def fill_here(queue_dir: str, n: int) -> None:
    from twisted.internet import defer, task
    from twisted.python.threadpool import ThreadPool

    from pymta.envelope import Envelope, Recipient, new_qid
    from pymta.queue.store import MaildirQueueStore

    body = b"From: a@example.org\r\nTo: b@sink.test\r\nSubject: backlog\r\n\r\n" + b"line\r\n" * 20

    @defer.inlineCallbacks
    def run(reactor):
        pool = ThreadPool(1, 4)
        pool.start()
        store = MaildirQueueStore(queue_dir, reactor, pool, fsync=False)
        for start in range(0, n, 500):
            envelopes = [Envelope(qid=new_qid(), sender="a@example.org", recipients=[Recipient(f"b{i}@sink.test")],
                                  size=len(body), arrival=time.time()) for i in range(start, min(n, start + 500))]  # fmt: skip
            yield defer.gatherResults([store.enqueue(env, body) for env in envelopes])
        pool.stop()

    task.react(run)


def settle(mta: MTA, limit: float) -> tuple[float, float]:
    """Wait (at most ``limit`` s) until nothing is left in incoming/ or active/; (seconds, main RSS MB)."""
    started = time.monotonic()
    while time.monotonic() - started < limit and mta.queue_files(("incoming", "active")):
        time.sleep(1)
    time.sleep(5)  # the last results written
    assert mta.proc is not None
    return time.monotonic() - started, rss_kb(mta.proc.pid) / 1024


def main() -> int:
    if sys.argv[1:2] == ["--fill"]:
        fill_here(sys.argv[2], int(sys.argv[3]))
        return 0
    sizes = [int(a) for a in sys.argv[1:]] or [0, 10000, 40000]
    rows = []
    for n in sizes:
        work = tempfile.mkdtemp(prefix="pymta-queue-rss-")
        mta = MTA(work, free_port(), free_port("127.0.0.9"), 2, retry=("1h", "1h"))  # nothing listens there
        os.makedirs(mta.state, exist_ok=True)
        fill(os.path.join(mta.state, "queue"), n)
        mta.start()
        took, first = settle(mta, 900)
        deferred = len(mta.queue_files(("deferred",)))
        mta.stop(signal.SIGTERM)
        mta.start()
        _, recovered = settle(mta, 300)
        mta.stop(signal.SIGTERM)
        rows.append((n, deferred, took, first, recovered))
        if len(rows) == 1:
            print("| queued N | deferred | s to try all | main RSS MB | main RSS MB after restart |")
            print("|---|---|---|---|---|")
        print(f"| {n} | {deferred} | {took:.0f} | {first:.0f} | {recovered:.0f} |", flush=True)
    for label, col in (("running", 3), ("after restart", 4)):
        per = slope([(r[0], r[col]) for r in rows])
        if per is not None:
            print(f"\nmain RSS per queued message ({label}): {per * 1024 * 1024:.0f} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
