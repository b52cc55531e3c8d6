#!/usr/bin/env python3
"""Soak: relay load through a real ``twistd pymta`` that is restarted with SIGKILL (or SIGTERM) at intervals.

SESSIONS client threads send numbered messages (``X-Soak-Id``) to the MTA at an offered RATE
(messages per second, one token bucket shared by the sessions, so the load is one the MTA can
deliver), and the MTA relays them to Debian's ``smtp-sink`` on loopback. Every RESTART_EVERY
seconds the MTA gets SIGNAL (``KILL`` or ``TERM``) and is started again on the same state
directory; after DURATION seconds the load stops, the MTA is given up to DRAIN seconds to empty
its queue, and is stopped with SIGTERM. Then the verdict:

* every acknowledged message (a 250 the client saw) is at the sink: ``lost`` must be 0;
* duplicates (delivered more than once) are each explained: with SIGKILL, a copy reached the sink
  before a kill and another after the restart (a kill between the remote 250 and our record of it:
  at-least-once delivery); with SIGTERM (a clean stop) there must be none;
* the accounting log has a ``received`` record for every acknowledged queue id and a
  ``delivered`` one for every message the sink has;
* RSS of the main process and of the listener workers, sampled every SAMPLE seconds with the
  queue's size beside it, and its slope (MB/min, least squares) after WARMUP seconds.

    bench/soak.py [--duration 600] [--restart-every 60] [--signal KILL|TERM] [--rate 50]
                  [--sessions 20] [--processes 2] [--drain 900] [--sample 30] [--warmup 120]

``--restart-every 0`` runs without restarts (RSS of one process at a steady rate). Only loopback is
used; every loop is bounded in time. Prints a Markdown table; exits 1 unless the verdict holds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINK = "127.0.0.9"
LIVE_STATES = ("incoming", "active", "deferred", "hold")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than 2 distinct x."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Slope of (seconds, value) points per minute; None with fewer than 3 points."""
    per_second = slope(points) if len(points) >= 3 else None
    return None if per_second is None else 60 * per_second


class TokenBucket:
    """``rate`` tokens per second shared by the client threads, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def take(self, stop: threading.Event) -> bool:
        """Wait for a token; False when ``stop`` is set first."""
        while not stop.is_set():
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
                self.at = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return True
                wait = (1 - self.tokens) / self.rate
            stop.wait(min(wait, 0.5))
        return False


class MTA:
    def __init__(self, workdir: str, port: int, sink_port: int, processes: int, retry: tuple[str, str] = ("2s", "5s")) -> None:
        self.workdir = workdir
        self.port = port
        self.state = os.path.join(workdir, "var")
        self.config = os.path.join(workdir, "pymta.toml")
        with open(self.config, "w") as f:
            f.write(f"""hostname = "soak.example.test"
state_dir = "{self.state}"
[smtp]
listen = ["tcp:{port}:interface=127.0.0.1"]
processes = {processes}
[domains]
local = ["example.test"]
relay_from = ["127.0.0.0/8"]
[routes]
"sink.test" = "{SINK}:{sink_port}"
[queue]
retry_initial = "{retry[0]}"
retry_max = "{retry[1]}"
""")
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYMTA_LOG_FILE=os.path.join(self.workdir, "log.jsonl"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "--logger=pymta.log.observer", "pymta", "--config", self.config],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.workdir, "twistd.out"), "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115 (kept open beyond this block)
        )  # fmt: skip
        self.started = time.monotonic()
        if not wait_port("127.0.0.1", self.port, 60):
            raise SystemExit("the MTA did not start listening within 60 s")

    def workers(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def rss_mb(self) -> tuple[float, float]:
        """(main process, listener workers together) in MB."""
        if self.proc is None:
            return 0.0, 0.0
        return rss_kb(self.proc.pid) / 1024, sum(rss_kb(p) for p in self.workers()) / 1024

    def stop(self, sig: int, wait: float = 60) -> float:
        """Signal the main process; seconds until it and its workers are gone."""
        assert self.proc is not None
        workers = self.workers()
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        for pid in workers:  # listener workers follow the main process
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        return time.monotonic() - started

    def queue_files(self, states: tuple[str, ...] = LIVE_STATES) -> list[str]:
        return [name for state in states for _, _, files in os.walk(os.path.join(self.state, "queue", state))
                for name in files]  # fmt: skip

    def queued(self) -> int:
        return len(self.queue_files())


class Load:
    """SESSIONS threads sending numbered messages at an offered rate; records the acknowledged ones."""

    def __init__(self, port: int, sessions: int, bucket: TokenBucket) -> None:
        self.port = port
        self.bucket = bucket
        self.acked: dict[str, str] = {}  # soak id -> queue id
        self.refused = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counter = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(sessions)]

    def next_id(self) -> str:
        with self.lock:
            self.counter += 1
            return f"s{self.counter:07d}"

    def run(self, index: int) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    client.ehlo("load.example.org")
                    for _ in range(20):
                        if not self.bucket.take(self.stop):
                            return
                        sid = self.next_id()
                        body = (f"From: load{index}@example.org\r\nTo: r{index}@sink.test\r\nSubject: soak {sid}\r\n"
                                f"X-Soak-Id: {sid}\r\n\r\n" + "soak line\r\n" * 20)  # fmt: skip
                        client.mail(f"load{index}@example.org")
                        client.rcpt(f"r{index}@sink.test")
                        code, text = client.data(body.encode())
                        if code == 250:
                            qid = text.decode(errors="replace").rsplit(" ", 1)[-1]
                            with self.lock:
                                self.acked[sid] = qid
                        else:
                            with self.lock:
                                self.refused += 1
            except (OSError, smtplib.SMTPException):
                self.stop.wait(0.2)  # the MTA was restarted: connect again

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def sink_copies(dump: str) -> dict[str, list[float]]:
    """soak id -> the times (file mtime) its copies reached the sink."""
    seen: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(dump, "*")):
        with open(path, "rb") as f:
            m = re.search(rb"X-Soak-Id: (s\d+)", f.read(4096))
        if m:
            seen.setdefault(m.group(1).decode(), []).append(os.stat(path).st_mtime)
    return seen


def accounting(state: str) -> dict[str, set[str]]:
    records: dict[str, set[str]] = {"received": set(), "delivered": set()}
    with open(os.path.join(state, "log", "accounting.jsonl"), "rb") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line after a kill
            if r.get("event") in records:
                records[r["event"]].add(r.get("qid"))
    return records


def lost_after_dot(log_file: str) -> set[str]:
    """Queue ids the MTA deferred because the connection was lost after the final dot (a
    possible duplicate it could not rule out: a shutdown grace ran out, a timeout, a reset)."""
    qids = set()
    with open(log_file, "rb") as f:
        for line in f:
            if b"may be a duplicate" in line:
                try:
                    qids.add(json.loads(line).get("qid"))
                except ValueError:
                    continue
    return qids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--restart-every", "--kill-every", type=float, default=60, help="0: no restarts")
    ap.add_argument("--signal", choices=("KILL", "TERM"), default="KILL", help="how the MTA is stopped at each restart")
    ap.add_argument("--rate", type=float, default=50, help="offered load, messages per second")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--drain", type=float, default=900, help="at most this long for the queue to empty")
    ap.add_argument("--sample", type=float, default=30, help="RSS sampling interval, seconds")
    ap.add_argument("--warmup", type=float, default=120, help="RSS slope from this many seconds on")
    args = ap.parse_args()
    if not os.path.exists("/usr/sbin/smtp-sink"):
        raise SystemExit("needs Debian's postfix (smtp-sink)")
    restart_signal = getattr(signal, f"SIG{args.signal}")
    work = tempfile.mkdtemp(prefix="pymta-soak-")
    dump = tempfile.mkdtemp(prefix="pymta-soak-sink-")
    os.chmod(dump, 0o777)
    sink_port = free_port(SINK)
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", "-d", os.path.join(dump, "%M."), f"{SINK}:{sink_port}",
                             "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(SINK, sink_port, 10)
    mta = MTA(work, free_port(), sink_port, args.processes)
    mta.start()
    load = Load(mta.port, args.sessions, TokenBucket(args.rate, max(1.0, args.rate / 10)))
    samples: list[tuple[float, float, float, float, int]] = []  # (t, process age, main MB, workers MB, queued)
    restarts: list[tuple[float, float]] = []  # (signalled, listening again), seconds since t0
    before_stop: list[int] = []  # indexes of the samples taken just before a restart
    stop_times: list[float] = []
    t0, wall0 = time.monotonic(), time.time()  # sink files carry wall-clock mtimes

    def sample() -> None:
        main_mb, workers_mb = mta.rss_mb()
        now = time.monotonic()
        samples.append((now - t0, now - mta.started, main_mb, workers_mb, mta.queued()))

    load.start()
    next_restart = t0 + args.restart_every if args.restart_every > 0 else float("inf")
    next_sample = t0
    try:
        while time.monotonic() - t0 < args.duration:
            now = time.monotonic()
            if now >= next_sample:
                sample()
                next_sample += args.sample
            if now >= next_restart:
                sample()  # the process at its oldest
                before_stop.append(len(samples) - 1)
                stop_times.append(mta.stop(restart_signal))
                mta.start()
                restarts.append((now - t0, time.monotonic() - t0))
                next_restart += args.restart_every
            time.sleep(0.2)
        load.finish()
        load_end = time.monotonic()
        deadline = load_end + args.drain
        while mta.queued() and time.monotonic() < deadline:
            if time.monotonic() >= next_sample:
                sample()
                next_sample += args.sample
            time.sleep(1)
        drain_time = time.monotonic() - load_end
        left_in_queue = mta.queued()
        sample()
        final_stop = mta.stop(signal.SIGTERM)
        time.sleep(2)  # smtp-sink finishes writing its last files
        seen = sink_copies(dump)
        acked = dict(load.acked)
        queued_qids = {name.split(".")[0] for name in mta.queue_files()}
        corrupt = len(mta.queue_files(("corrupt",)))
        lost = sorted(sid for sid in acked if sid not in seen and acked[sid] not in queued_qids)
        still_queued = sum(1 for sid in acked if sid not in seen and acked[sid] in queued_qids)
        after_dot = lost_after_dot(os.path.join(work, "log.jsonl"))
        by_kill, by_abort, unexplained = 0, 0, []
        for sid, times in seen.items():
            if len(times) < 2:
                continue
            first, last = min(times) - wall0, max(times) - wall0
            if args.signal == "KILL" and any(first <= up + 1 and last >= down - 1 for down, up in restarts):
                by_kill += len(times) - 1  # one copy before a kill, one after the restart
            elif acked.get(sid) in after_dot:
                by_abort += len(times) - 1  # the MTA said so: connection lost after the final dot
            else:
                unexplained.append(sid)
        duplicates = sum(len(t) - 1 for t in seen.values() if len(t) > 1)
        records = accounting(mta.state)
        no_received = [sid for sid, qid in acked.items() if qid not in records["received"]]
        no_delivered = sorted(q for q in {acked[sid] for sid in seen if sid in acked} if q not in records["delivered"])
    finally:
        load.stop.set()
        if mta.proc is not None and mta.proc.poll() is None:
            mta.stop(signal.SIGKILL)
        sink.terminate()
        sink.wait(10)
    # With restarts, each process is young; the slope is over the samples taken just before each
    # stop (the process at its oldest); without, over every sample after the warm-up.
    chosen = [samples[i] for i in before_stop] if before_stop else samples
    warm = [s for s in chosen if s[0] >= args.warmup]
    main_slope = slope_per_minute([(t, m) for t, _, m, _, _ in warm])
    workers_slope = slope_per_minute([(t, w) for t, _, _, w, _ in warm])

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2f}"

    mode = f"SIG{args.signal} every {args.restart_every:.0f} s ({len(restarts)} restarts)" if args.restart_every > 0 else "no restarts"
    print(f"## Soak: {args.duration:.0f} s at {args.rate:g} msg/s offered, {args.sessions} sessions, {mode}, "
          f"processes = {args.processes}\n")  # fmt: skip
    print("| figure | value |\n|---|---|")
    for name, value in [
        ("messages acknowledged (250)", len(acked)),
        ("refused or tempfailed answers", load.refused),
        ("distinct acknowledged messages at the sink (delivered)", sum(1 for sid in acked if sid in seen)),
        ("lost (acknowledged, not at the sink, not queued)", len(lost)),
        ("still queued after the drain", f"{still_queued} ({left_in_queue} queue files)"),
        ("drain after the load stopped (s)", f"{drain_time:.0f}"),
        ("duplicates at the sink", duplicates),
        ("  a copy before a SIGKILL and one after the restart (at-least-once)", by_kill),
        ("  connection lost after the final dot, logged as `may be a duplicate`", by_abort),
        ("  unexplained", len(unexplained)),
        ("acknowledged without a `received` record", len(no_received)),
        ("delivered without a `delivered` record", len(no_delivered)),
        ("messages in corrupt/", corrupt),
        ("restart stop times, s (max)", f"{max(stop_times):.1f}" if stop_times else "n/a"),
        ("final SIGTERM to exit (s)", f"{final_stop:.1f}"),
        ("RSS main MB (first / max / last)", f"{samples[0][2]:.0f} / {max(s[2] for s in samples):.0f} / {samples[-1][2]:.0f}"),
        ("RSS workers MB (first / max / last)", f"{samples[0][3]:.0f} / {max(s[3] for s in samples):.0f} / {samples[-1][3]:.0f}"),
        (f"RSS slope after {args.warmup:.0f} s{' (samples before each restart)' if before_stop else ''}, MB/min "
         "(main / workers)", f"{fmt(main_slope)} / {fmt(workers_slope)}"),
        ("queue size (max)", max(s[4] for s in samples)),
    ]:  # fmt: skip
        print(f"| {name} | {value} |")
    print("\nsamples (t s, process age s, main MB, workers MB, queued):")
    print(", ".join(f"{t:.0f}/{a:.0f}:{m:.0f}+{w:.0f}q{q}" for t, a, m, w, q in samples))
    if lost:
        print("lost ids (first 20): " + ", ".join(lost[:20]))
    if unexplained:
        print("unexplained duplicates (first 20): " + ", ".join(unexplained[:20]))
    shutil.rmtree(dump, ignore_errors=True)
    print(f"\nstate kept in {work}")
    clean_stop_duplicates = args.signal == "TERM" and duplicates
    bad = lost or still_queued or unexplained or clean_stop_duplicates or no_received or no_delivered or corrupt
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
