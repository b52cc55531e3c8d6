#!/usr/bin/env python3
"""Measure the cost of the inbound state backends: decisions per second for a connection
(acquire + release), a rate take and a greylist check, with 1 and with N processes sharing
the ``local`` SQLite store, against the in-process ``memory`` backend.

Usage: python bench/inbound_state.py [--count 20000] [--processes 1 2] [--dir DIR]

Each process makes --count decisions of each kind over 1000 client keys (greylist: new and
known triples) on a fresh database under --dir (default: a temporary directory on the disk of
the current directory). Prints one line per backend, operation and process count: total
decisions per second and the mean microseconds per decision. Bounded by --count.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymta.rate import parse_rate
from pymta.state.local import LocalInboundState
from pymta.state.memory import MemoryInboundState


class WallClock:
    def seconds(self) -> float:
        return time.time()


RATE = parse_rate("100000/s, burst=1000")


def operations(state):
    def connection(i: int) -> None:
        key = f"192.0.2.{i % 1000}/32"
        state.acquire_connection(key, 50)
        state.release_connection(key)

    def rate(i: int) -> None:
        state.take("messages", f"192.0.2.{i % 1000}/32", RATE)

    def greylist(i: int) -> None:
        state.greylist((f"192.0.{i % 1000 // 250}.0/24", f"s{i % 1000}@remote.example", "rcpt@example.test"),
                       0, 3600, 86400)  # fmt: skip

    return {"connection": connection, "rate": rate, "greylist": greylist}


def run(backend: str, path: str, op: str, count: int, start: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    state = LocalInboundState(path, WallClock()) if backend == "local" else MemoryInboundState(WallClock())
    work = operations(state)[op]
    start.wait(30)
    began = time.perf_counter()
    for i in range(count):
        work(i)
    out.put(time.perf_counter() - began)
    state.close()


def measure(backend: str, directory: str, op: str, count: int, processes: int) -> tuple[float, float]:
    path = os.path.join(directory, f"{backend}-{op}-{processes}.sqlite")
    LocalInboundState(path, WallClock()).close()  # schema and WAL mode before the workers race
    start, out = multiprocessing.Event(), multiprocessing.Queue()
    workers = [multiprocessing.Process(target=run, args=(backend, path, op, count, start, out)) for _ in range(processes)]
    for w in workers:
        w.start()
    began = time.perf_counter()
    start.set()
    durations = [out.get(timeout=600) for _ in workers]
    wall = time.perf_counter() - began
    for w in workers:
        w.join(30)
    total = count * processes
    return total / wall, 1e6 * sum(durations) / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pymta-bench-state-", dir=args.dir or os.getcwd())
    try:
        print(f"{'backend':8} {'operation':10} {'procs':>5} {'decisions/s':>12} {'us/decision':>12}")
        for backend in ("memory", "local"):
            for op in ("connection", "rate", "greylist"):
                for n in args.processes if backend == "local" else [1]:
                    rate, micros = measure(backend, directory, op, args.count, n)
                    print(f"{backend:8} {op:10} {n:5d} {rate:12.0f} {micros:12.1f}", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
