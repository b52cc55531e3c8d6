#!/usr/bin/env python3
"""The cost of one hop from the reactor thread to a pool thread and back (deferToThreadPool of a
function that does nothing), through twisted's ThreadPool, through the standard library's
ThreadPoolExecutor (behind the same two-method adapter) and through pymta.threads.FilePool.

Usage: python bench/thread_hop.py [--hops 5000] [--rounds 3]

Prints wall and CPU microseconds per hop for each pool, alternated over ``--rounds``, and the
medians. Not a test: numbers only. Bounded by --hops x --rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from pymta.threads import FilePool


class Executor:
    """concurrent.futures.ThreadPoolExecutor as deferToThreadPool needs it."""

    def __init__(self, size: int) -> None:
        self.executor = ThreadPoolExecutor(size)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.executor.shutdown(wait=True)

    def callInThreadWithCallback(self, on_result: Any, func: Any, *args: Any, **kw: Any) -> None:  # twisted API name
        def job() -> None:
            try:
                result, ok = func(*args, **kw), True
            except BaseException:
                result, ok = Failure(), False
            on_result(ok, result)

        self.executor.submit(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pools: dict[str, Any] = {"twisted ThreadPool": ThreadPool(2, 16), "stdlib ThreadPoolExecutor": Executor(16),
                             "pymta FilePool": FilePool(16, "bench")}  # fmt: skip
    for pool in pools.values():
        pool.start()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in pools}

    @defer.inlineCallbacks
    def run() -> Any:
        try:
            for _ in range(args.rounds):
                for name, pool in pools.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    for _ in range(args.hops):
                        yield deferToThreadPool(reactor, pool, lambda: None)
                    results[name].append(((time.perf_counter() - wall) / args.hops * 1e6,
                                          (time.process_time() - cpu) / args.hops * 1e6))  # fmt: skip
                    print(f"{name}: {results[name][-1][0]:.1f} us wall, {results[name][-1][1]:.1f} us CPU per hop")
        finally:
            for pool in pools.values():
                pool.stop()
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    for name, rows in results.items():
        print(f"median {name}: {statistics.median(w for w, _ in rows):.1f} us wall, "
              f"{statistics.median(c for _, c in rows):.1f} us CPU per hop")  # fmt: skip


if __name__ == "__main__":
    main()
