#!/usr/bin/env python3
"""Soak: relay load through a real ``twistd pymta`` that is killed with SIGKILL at intervals.

SESSIONS client threads send numbered messages (``X-Soak-Id``) to the MTA, which relays them to
Debian's ``smtp-sink`` on loopback. Every KILL_EVERY seconds the MTA gets SIGKILL and is started
again on the same state directory; after DURATION seconds the load stops, the queue is left to
drain, and the MTA is stopped with SIGTERM. Then every acknowledged message (a 250 the client
saw) is reconciled against the sink: lost (acknowledged, never delivered), duplicates (delivered
more than once: a kill between the remote 250 and our record of it), and against the accounting
log (a `received` record for every acknowledged queue id, a `delivered` one for every message
the sink has). RSS of the MTA's process tree is sampled every 30 s.

    bench/soak.py [--duration 600] [--kill-every 60] [--sessions 20] [--processes 2]

Only loopback is used; every loop is bounded in time. Prints a Markdown table.
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


class MTA:
    def __init__(self, workdir: str, port: int, sink_port: int, processes: int) -> None:
        self.workdir = workdir
        self.port = port
        self.state = os.path.join(workdir, "var")
        self.config = os.path.join(workdir, "pymta.toml")
        with open(self.config, "w") as f:
            f.write(f'''hostname = "soak.example.test"
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
retry_initial = "2s"
retry_max = "5s"
shutdown_grace = "10s"
''')
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYMTA_LOG_FILE=os.path.join(self.workdir, "log.jsonl"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "--logger=pymta.log.observer", "pymta", "--config", self.config],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.workdir, "twistd.out"), "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not wait_port("127.0.0.1", self.port, 60):
            raise SystemExit("the MTA did not start listening within 60 s")

    def tree(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [self.proc.pid, *(int(p) for p in out.split())]

    def rss_mb(self) -> float:
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
            except (OSError, StopIteration):
                pass
        return total / 1024

    def kill(self, sig: int, wait: float = 60) -> float:
        assert self.proc is not None
        pids = self.tree()
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        for pid in pids[1:]:  # listener workers follow the main process
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        return time.monotonic() - started

    def queued(self) -> int:
        return sum(len(files) for state in ("incoming", "active", "deferred")
                   for _, _, files in os.walk(os.path.join(self.state, "queue", state)))  # fmt: skip


class Load:
    """SESSIONS threads, each sending numbered messages; records the acknowledged ones."""

    def __init__(self, port: int, sessions: int) -> None:
        self.port = port
        self.sessions = sessions
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
                        if self.stop.is_set():
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
                time.sleep(0.2)  # the MTA was killed: connect again

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--kill-every", type=float, default=60)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--drain", type=float, default=300, help="at most this long for the queue to empty")
    args = ap.parse_args()
    if not os.path.exists("/usr/sbin/smtp-sink"):
        raise SystemExit("needs Debian's postfix (smtp-sink)")
    work = tempfile.mkdtemp(prefix="pymta-soak-")
    dump = tempfile.mkdtemp(prefix="pymta-soak-sink-")
    os.chmod(dump, 0o777)
    sink_port = free_port(SINK)
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", "-d", os.path.join(dump, "%M."), f"{SINK}:{sink_port}",
                             "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(SINK, sink_port, 10)
    mta = MTA(work, free_port(), sink_port, args.processes)
    mta.start()
    load = Load(mta.port, args.sessions)
    load.start()
    rss: list[tuple[float, float]] = []
    kills, stops = 0, []
    t0 = time.monotonic()
    next_kill = t0 + args.kill_every
    next_sample = t0
    try:
        while time.monotonic() - t0 < args.duration:
            now = time.monotonic()
            if now >= next_sample:
                rss.append((now - t0, mta.rss_mb()))
                next_sample += 30
            if now >= next_kill:
                mta.kill(signal.SIGKILL)
                kills += 1
                mta.start()
                next_kill += args.kill_every
            time.sleep(0.2)
        load.finish()
        deadline = time.monotonic() + args.drain
        while mta.queued() and time.monotonic() < deadline:
            time.sleep(1)
        left_in_queue = mta.queued()
        rss.append((time.monotonic() - t0, mta.rss_mb()))
        stops.append(mta.kill(signal.SIGTERM))
        time.sleep(2)  # smtp-sink finishes writing its last files
        seen: dict[str, int] = {}
        for path in glob.glob(os.path.join(dump, "*")):
            with open(path, "rb") as f:
                m = re.search(rb"X-Soak-Id: (s\d+)", f.read())
            if m:
                sid = m.group(1).decode()
                seen[sid] = seen.get(sid, 0) + 1
        acked = load.acked
        queued_qids = {name.split(".")[0] for state in ("incoming", "active", "deferred", "hold")
                       for _, _, files in os.walk(os.path.join(mta.state, "queue", state)) for name in files}  # fmt: skip
        lost = sorted(sid for sid in acked if sid not in seen and acked[sid] not in queued_qids)
        duplicates = sum(n - 1 for n in seen.values() if n > 1)
        records: dict[str, set[str]] = {"received": set(), "delivered": set()}
        with open(os.path.join(mta.state, "log", "accounting.jsonl"), "rb") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a kill
                if r.get("event") in records:
                    records[r["event"]].add(r.get("qid"))
        no_received = [sid for sid, qid in acked.items() if qid not in records["received"]]
        delivered_qids = {acked[sid] for sid in seen if sid in acked}
        no_delivered = sorted(q for q in delivered_qids if q not in records["delivered"])
    finally:
        load.stop.set()
        if mta.proc is not None and mta.proc.poll() is None:
            mta.kill(signal.SIGKILL)
        sink.terminate()
        sink.wait(10)
    print(f"## Soak: {args.duration:.0f} s, {args.sessions} sessions, SIGKILL every {args.kill_every:.0f} s "
          f"({kills} kills), processes = {args.processes}\n")  # fmt: skip
    print("| figure | value |\n|---|---|")
    for name, value in [
        ("messages acknowledged (250)", len(acked)),
        ("refused or tempfailed answers", load.refused),
        ("distinct acknowledged messages at the sink", sum(1 for sid in acked if sid in seen)),
        ("lost (acknowledged, never delivered)", len(lost)),
        ("duplicates at the sink", duplicates),
        ("left in the queue after the drain (not lost: still queued)", left_in_queue),
        ("acknowledged without a `received` record", len(no_received)),
        ("delivered without a `delivered` record", len(no_delivered)),
        ("final SIGTERM to exit (s)", f"{stops[-1]:.1f}"),
        ("RSS of the process tree, MB (first / max / last)",
         f"{rss[0][1]:.0f} / {max(r for _, r in rss):.0f} / {rss[-1][1]:.0f}"),
    ]:  # fmt: skip
        print(f"| {name} | {value} |")
    print("\nRSS samples (s, MB): " + ", ".join(f"{t:.0f}:{r:.0f}" for t, r in rss))
    if lost:
        print("lost ids (first 20): " + ", ".join(lost[:20]))
    shutil.rmtree(dump, ignore_errors=True)
    print(f"\nstate kept in {work}")
    return 1 if lost or no_received else 0


if __name__ == "__main__":
    raise SystemExit(main())
