#!/usr/bin/env python3
"""How pymta scales with the size of its queue (issue 9, point 5).

Usage: python bench/queue_scale.py [--sizes 10000 100000 1000000] [--base /var/tmp/pymta-scale]
       [--messages 2000] [--sessions 10] [--processes 1] [--fsync]

For each size a state directory ``BASE/qSIZE`` is filled once (bench/queue_fill.py: the store's
own API, fsync off for the fill only, 2 KB messages deferred for 20 h) and kept for later runs.
Then, for an empty queue (after one start not measured) and for each size, in the same run:

* ``twistd -n pymta`` starts on it; reported: seconds until the listener greets (``greet_s``),
  until the queue is recovered (``recover_s``, from the ``queue_recovered`` log event, with the
  count), the CPU seconds the MTA used until then (``cpu_s``: wall times are noisy on a shared
  machine), RSS and peak RSS of the MTA after recovery (``rss_mib``, ``hwm_mib``);
* ``smtp-source`` sends ``--messages`` 2 KB messages over ``--sessions`` sessions to it, relayed
  to ``smtp-sink``; reported: accepted messages/s (``accept_mps``) and its ratio to the empty
  queue's (``vs_empty``);
* with ``--during N``, N more messages sent right after the greeting: accepted messages/s while
  the queue is still being read (``during_mps``; ``during_recovery`` tells whether it still was
  when the last one was accepted); with ``--cold`` the page cache is dropped before each start;
* ``pymta-queue list --limit 100`` against the running MTA: seconds for the first page (``list_s``);
* in this process, a timer heap (:class:`pymta.queue.scheduler.TimerHeapScheduler` on
  ``task.Clock``) holding SIZE entries: microseconds to schedule a message due first and have it
  picked (``pick_us``, median of 2,000).

``--held-only N`` instead reports the bytes per deferred message a queue manager holds after
recovering N of them (no disk, no MTA: the part of the RSS that grows with the queue).

Not a test: numbers only, one JSON line per size and a table at the end. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task

from bench.pymta_config import write_bench_config
from bench.queue_fill import fill
from pymta.envelope import new_qid
from pymta.interfaces import DEFERRED
from pymta.queue.manager import QueueManager
from pymta.queue.scheduler import TimerHeapScheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greet(port: int, seconds: float) -> bool:
    """Wait (bounded) for a 220 greeting on ``port``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def recovered_event(log_path: str) -> dict | None:
    try:
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                if '"queue_recovered"' in line:
                    return json.loads(line)
    except FileNotFoundError:
        pass
    return None


def rss_mib(pid: int) -> tuple[float, float]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (the machine may be shared: wall time is noisy)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pick_us(size: int, repeats: int = 2000) -> float:
    """Median µs for a timer heap of ``size`` entries to take a new first entry and hand it out."""
    clock = task.Clock()
    clock.advance(1_000_000)
    picked: list[object] = []
    scheduler = TimerHeapScheduler(clock, picked.append)
    rng = random.Random(9)
    for n in range(size):
        scheduler.schedule(n, clock.seconds() + 3600 + rng.random() * 72000)
    times = []
    for n in range(repeats):
        start = time.perf_counter()
        scheduler.schedule(("new", n), clock.seconds() + 1)
        clock.advance(1)
        times.append(time.perf_counter() - start)
    assert len(picked) == repeats
    return statistics.median(times) * 1e6


class RecoveredOnly:
    """A store whose recovery hands over ``count`` deferred messages (no disk): what the queue
    manager holds per message, apart from the store's own index (one dict entry per qid)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def recover_incrementally(self, on_batch: Any) -> Any:
        now = time.time()
        for start in range(0, self.count, 4096):
            on_batch([(new_qid(now - 3600) + f"{n:07d}", DEFERRED, now + 72000 + n % 3600, now - 3600)
                      for n in range(start, min(start + 4096, self.count))])  # fmt: skip
        return defer.succeed({})


def held_bytes_per_message(count: int) -> float:
    """RSS growth per message of a queue manager that recovered ``count`` deferred messages."""
    gc.collect()
    before = rss_mib(os.getpid())[0]
    clock = task.Clock()
    clock.advance(time.time())
    manager = QueueManager(RecoveredOnly(count), {}, clock, "mx.bench.example", wall=clock)
    manager.startService()
    assert len(manager.scheduler) == count
    held = (rss_mib(os.getpid())[0] - before) * 1024 * 1024 / count
    manager.stopService()
    return held


def start_mta(workdir: str, config: str, log_path: str) -> tuple[subprocess.Popen, Any]:
    """``twistd -n pymta`` on ``config``, logging JSON to ``log_path``; (process, its stderr file)."""
    env = dict(os.environ, PYMTA_LOG_FILE=log_path, PYTHONPATH=ROOT)
    stderr = open(os.path.join(workdir, "twistd.stderr"), "ab")  # noqa: SIM115 (kept open beyond this block)
    proc = subprocess.Popen([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logger=pymta.log.observer", "pymta",
                             "--config", config], cwd=workdir, env=env, stdout=stderr, stderr=stderr)  # fmt: skip
    return proc, stderr


def stop_mta(proc: subprocess.Popen, stderr: Any) -> None:
    """SIGTERM, then (after 60 s) SIGKILL, by PID."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    stderr.close()


def send(port: int, messages: int, sessions: int) -> None:
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "2048",
                    "-f", "sender@bench.example", "-t", "rcpt@sink.example", f"127.0.0.1:{port}"],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)  # fmt: skip


def measure(state_dir: str, size: int, args: argparse.Namespace, sink_port: int) -> dict:
    port = free_port()
    config = write_bench_config(os.path.join(state_dir, "pymta.toml"), state_dir, port, sink_port,
                                processes=args.processes, fsync=args.fsync)
    log_path = os.path.join(state_dir, "pymta.log.jsonl")
    if os.path.exists(log_path):
        os.unlink(log_path)
    if args.cold:  # the queue read from the disk, not from the page cache
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    start = time.monotonic()
    wall_start = time.time()
    proc, stderr = start_mta(state_dir, config, log_path)
    row: dict = {"size": size}
    try:
        if not greet(port, 120):
            raise RuntimeError(f"no greeting within 120 s (see {state_dir}/twistd.stderr)")
        row["greet_s"] = round(time.monotonic() - start, 2)
        if args.during:  # accepted while the queue is still being read
            t0 = time.monotonic()
            send(port, args.during, args.sessions)
            row["during_mps"] = round(args.during / (time.monotonic() - t0), 1)
            row["during_recovery"] = recovered_event(log_path) is None  # still reading when the last was accepted
        deadline = time.monotonic() + args.recover_timeout
        event = None
        while event is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            event = recovered_event(log_path)
        if event is None:
            raise RuntimeError("no queue_recovered event")
        row["recover_s"] = round(datetime.fromisoformat(event["time"]).timestamp() - wall_start, 2)
        row["recovered"] = event.get("queued")
        row["cpu_s"] = round(cpu_s(proc.pid), 1)  # start-up and recovery, in CPU seconds
        row["rss_mib"], row["hwm_mib"] = (round(v) for v in rss_mib(proc.pid))
        t0 = time.monotonic()
        send(port, args.messages, args.sessions)
        row["accept_mps"] = round(args.messages / (time.monotonic() - t0), 1)
        t0 = time.monotonic()
        listed = subprocess.run([os.path.join(BIN, "pymta-queue"), "--config", config, "--json", "list", "--limit",
                                 "100"], capture_output=True, timeout=600)  # fmt: skip
        row["list_s"] = round(time.monotonic() - t0, 2)
        row["list_n"] = len(json.loads(listed.stdout)) if listed.returncode == 0 else f"failed: {listed.stderr[-200:]!r}"
        row["rss_after_mib"] = round(rss_mib(proc.pid)[0])
    finally:
        stop_mta(proc, stderr)
    row["pick_us"] = round(pick_us(size), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--base", default="/var/tmp/pymta-scale", help="where the filled queues are kept")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1, help="[smtp] processes")
    parser.add_argument("--fsync", action="store_true", help="[queue] fsync = true for the MTA runs")
    parser.add_argument("--recover-timeout", type=float, default=900.0)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each start (root)")
    parser.add_argument("--during", type=int, default=0, metavar="N",
                        help="also send N messages right after the greeting, while the queue is read")
    parser.add_argument("--held-only", type=int, default=None, metavar="N",
                        help="only report what the queue manager holds per deferred message for N of them")
    args = parser.parse_args()
    if args.held_only:
        print(json.dumps({"size": args.held_only, "manager_bytes_per_message": round(held_bytes_per_message(args.held_only))}))
        return
    sink_port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *user, "-c", f"127.0.0.1:{sink_port}", "1000"], stdout=subprocess.DEVNULL)
    rows = []
    try:
        empty = tempfile.mkdtemp(prefix="pymta-scale-empty-", dir=args.base if os.path.isdir(args.base) else None)
        try:
            measure(empty, 0, args, sink_port)  # a warm-up: the first start of all pays for cold caches
            shutil.rmtree(empty, True)
            os.makedirs(empty)
            rows.append(measure(empty, 0, args, sink_port))
        finally:
            shutil.rmtree(empty, True)
        print(json.dumps(rows[-1]), flush=True)
        for size in args.sizes:
            state_dir = os.path.join(args.base, f"q{size}")
            queue = os.path.join(state_dir, "queue")
            if not os.path.isdir(os.path.join(queue, "deferred")):
                t0 = time.monotonic()
                fill(queue, size, 2048, 72_000)
                print(f"filled {size} in {time.monotonic() - t0:.0f} s (fsync off)", file=sys.stderr, flush=True)
            rows.append(measure(state_dir, size, args, sink_port))
            rows[-1]["vs_empty"] = round(rows[-1]["accept_mps"] / rows[0]["accept_mps"], 3)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
    cols = ["size", "greet_s", "during_mps", "during_recovery", "recover_s", "cpu_s", "recovered", "rss_mib", "hwm_mib",
            "accept_mps", "vs_empty", "list_s", "pick_us"]  # fmt: skip
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "-")) for c in cols))


if __name__ == "__main__":
    main()
