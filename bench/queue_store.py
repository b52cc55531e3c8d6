#!/usr/bin/env python3
"""Measure MaildirQueueStore.enqueue throughput: N enqueues in flight at once, messages/s and dir fsyncs.

Usage: python bench/queue_store.py [--count 3000] [--concurrency 1 10 50] [--size 2048]
       [--threads 16] [--dir DIR] [--churn 20000]

Each run uses a fresh queue directory under --dir (default: a temporary directory on the disk of
the current directory). --churn first creates and deletes that many files in the queue's
directories, the steady state of a relaying MTA. Prints one line per concurrency level.
Bounded: every run stops after --count messages.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool

from pymta.envelope import Envelope, Recipient, new_qid
from pymta.queue.store import MaildirQueueStore


def churn(root: str, count: int) -> None:
    for sub in ("tmp", "data", "incoming"):
        path = os.path.join(root, sub)
        for i in range(count // 3):
            name = os.path.join(path, f"churn{i}")
            with open(name, "wb") as f:
                f.write(b"x" * 2048)
            os.unlink(name)


@defer.inlineCallbacks
def run(reactor, args, concurrency: int, base: str):
    root = tempfile.mkdtemp(prefix="queue-bench-", dir=base)
    pool = ThreadPool(minthreads=2, maxthreads=args.threads, name="bench-io")
    pool.start()
    try:
        store = MaildirQueueStore(root, reactor, pool)
        store.recover()
        if args.churn:
            yield task.deferLater(reactor, 0, churn, root, args.churn)
        body = (b"X" * 76 + b"\r\n") * (args.size // 78)
        sem = defer.DeferredSemaphore(concurrency)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()

        def one():
            env = Envelope(new_qid(), "a@example.org", [Recipient("b@example.net")], size=len(body))
            return store.enqueue(env, body)

        yield defer.gatherResults([sem.run(one) for _ in range(args.count)])
        elapsed = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(
            f"concurrency={concurrency:3d} msgs={args.count} {args.count / elapsed:7.0f} msgs/s "
            f"dir_fsyncs/msg={store.syncer.fsyncs / args.count:.2f} cpu_ms/msg={1000 * cpu / args.count:.2f}",
            flush=True,
        )
    finally:
        pool.stop()
        shutil.rmtree(root, ignore_errors=True)


@defer.inlineCallbacks
def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--churn", type=int, default=0)
    parser.add_argument("--dir", default=os.getcwd())
    args = parser.parse_args(argv)
    for concurrency in args.concurrency:
        yield run(reactor, args, concurrency, args.dir)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
