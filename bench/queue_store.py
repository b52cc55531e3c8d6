#!/usr/bin/env python3
"""Measure MaildirQueueStore throughput: N messages in flight at once, messages/s and file-system operations per message.

Usage: python bench/queue_store.py [--count 3000] [--concurrency 1 10 50] [--size 2048]
       [--threads 16] [--dir DIR] [--churn 20000] [--life accept|deliver|defer]

Each run uses a fresh queue directory under --dir (default: a temporary directory on the disk of
the current directory). --churn first creates and deletes that many files in the queue's
directories, the steady state of a relaying MTA. --life says what happens to each message:
``accept`` (enqueue only), ``deliver`` (enqueue, move to active, record the result, remove: a
relayed message's whole life) or ``defer`` (enqueue, active, record a deferral, move to deferred).
Prints one line per concurrency level: messages/s, then per message the files created, file
fsyncs, directory fsyncs, renames, unlinks and CPU milliseconds. Bounded: every run stops after
--count messages.
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
from pymta.fsio import FileOps
from pymta.interfaces import ACTIVE, DEFERRED
from pymta.queue.store import MaildirQueueStore


class CountingOps(FileOps):
    """FileOps that count what they do (the GIL makes the increments safe enough for a benchmark)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(("creates", "fsyncs", "dir_fsyncs", "renames", "unlinks"), 0)

    def open(self, path, flags, mode=0o600):
        if flags & os.O_CREAT:
            self.counts["creates"] += 1
        return super().open(path, flags, mode)

    def fsync(self, fd):
        self.counts["fsyncs"] += 1
        super().fsync(fd)

    def fsync_dir(self, path):
        self.counts["dir_fsyncs"] += 1
        super().fsync_dir(path)

    def rename(self, src, dst):
        self.counts["renames"] += 1
        super().rename(src, dst)

    def unlink(self, path):
        self.counts["unlinks"] += 1
        super().unlink(path)


def churn(root: str, count: int) -> None:
    subs = [sub for sub in ("tmp", "data", "incoming") if os.path.isdir(os.path.join(root, sub))]
    for sub in subs:  # data/ is the bodies' directory of the layout before one file per message
        path = os.path.join(root, sub)
        for i in range(count // len(subs)):
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
        ops = CountingOps()
        store = MaildirQueueStore(root, reactor, pool, ops=ops)
        if args.churn:
            yield task.deferLater(reactor, 0, churn, root, args.churn)
        body = (b"X" * 76 + b"\r\n") * (args.size // 78)
        sem = defer.DeferredSemaphore(concurrency)
        for key in ops.counts:
            ops.counts[key] = 0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()

        @defer.inlineCallbacks
        def one():
            env = Envelope(new_qid(), "a@example.org", [Recipient("b@example.net")], size=len(body))
            yield store.enqueue(env, body)
            if args.life == "accept":
                return
            yield store.move(env.qid, ACTIVE)
            env.attempts = 1
            env.recipients[0].attempts = 1
            env.recipients[0].state = "delivered" if args.life == "deliver" else "deferred"
            env.recipients[0].reply = {"code": 250, "enhanced": "2.0.0", "text": "ok queued as 1234"}
            yield store.update(env)
            if args.life == "deliver":
                yield store.remove(env.qid)
            else:
                yield store.move(env.qid, DEFERRED)

        yield defer.gatherResults([sem.run(one) for _ in range(args.count)])
        elapsed = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        per_msg = " ".join(f"{k}/msg={v / args.count:.2f}" for k, v in ops.counts.items())
        print(
            f"life={args.life} concurrency={concurrency:3d} msgs={args.count} {args.count / elapsed:7.0f} msgs/s "
            f"{per_msg} cpu_ms/msg={1000 * cpu / args.count:.2f}",
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
    parser.add_argument("--life", choices=("accept", "deliver", "defer"), default="accept")
    args = parser.parse_args(argv)
    for concurrency in args.concurrency:
        yield run(reactor, args, concurrency, args.dir)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
