"""HTTP injection against SMTP submission of the same mail, through the real ``twistd pymta``.

    python bench/inject.py [--recipients 10000] [--runs 3] [--batch 100 --batch 1000] [--smtp-conc 10] [--accept-only]

One pymta (``[queue] fsync = true``, one listener process, relaying to smtp-sink on loopback) takes
the same personalised messages both ways in the same run:

* ``http/B``: ``POST /api/v1/inject`` with B recipients a request (per-recipient substitutions;
  pymta renders, builds and queues one message per recipient), ``--http-conc`` requests at once;
* ``smtp``: the client builds the very same messages (pymta's own MessageBuilder, so size and
  headers match) before the clock starts and submits them over ``--smtp-conc`` SMTP sessions,
  one message (one recipient) per transaction.

For each way, after a warm-up, ``--runs`` runs (interleaved): accepted messages/s (first request
to the last 250 / HTTP answer), pymta's CPU per message while accepting (user+system of the
twistd process), and end to end (until the queue is empty again: smtp-sink has them all).
Printed: medians and the HTTP/SMTP ratios. ``--accept-only``: ``[queue] deliver = false`` and a
fresh pymta for every run, so only the two ways in are measured (no delivery shares the CPU).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.pymta_config import write_bench_config  # noqa: E402
from tests.mta_process import free_port, wait_for_port  # noqa: E402

TOKEN = "bench-inject-token-0123456789abcdefghij"
HZ = os.sysconf("SC_CLK_TCK")
FILLER = " ".join(f"word{i}" for i in range(300))  # one long line: both parts quoted-printable, ~5.6 KB


def content() -> dict:
    return {
        "from": {"email": "news@bench.example", "name": "Bench News"},
        "subject": "Hello {{ first }}, your {{ month }} digest",
        "text_body": "Hi {{ first }},\n\n{{ filler }}\n\nAccount {{ n }}\n",
        "html_body": "<p>Hi {{ first }},</p><p>{{ filler }}</p><p>Account {{ n }}</p>",
        "headers": {"X-Campaign": "bench"},
    }


def recipients(n: int, tag: str) -> list[dict]:
    return [{"email": f"r{i}-{tag}@dest.example", "substitutions": {"first": f"F{i}", "n": i}} for i in range(n)]


GLOBAL = {"month": "December", "filler": FILLER}


def wait_port(port: int) -> None:
    wait_for_port("127.0.0.1", port, 60)


def cpu_seconds(pid: int) -> float:
    """user+system of the process and of its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in rest[11:15]) / HZ


def queue_empty(state_dir: str) -> bool:
    for state in ("incoming", "active", "deferred"):
        for _dir, _subdirs, names in os.walk(os.path.join(state_dir, "queue", state)):
            if names:
                return False
    return True


def wait_empty(state_dir: str, seconds: float = 900.0) -> None:
    deadline = time.monotonic() + seconds
    while not queue_empty(state_dir):
        if time.monotonic() > deadline:
            raise SystemExit("the queue did not drain")
        time.sleep(0.02)


class Pymta:
    def __init__(self, workdir: str, sink_port: int, deliver: bool = True, extra: str = "") -> None:
        self.state = os.path.join(workdir, "var")
        self.sink_port = sink_port
        self.smtp_port, self.api_port = free_port(), free_port()
        tokens = os.path.join(workdir, "tokens")
        with open(tokens, "w") as f:
            f.write(f"bench:inject:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
        self.config = os.path.join(workdir, "pymta.toml")
        tail = f"""[http]
listen = ["tcp:{self.api_port}:interface=127.0.0.1"]
tokens_file = "{tokens}"
max_body = 67108864
{extra}"""
        write_bench_config(self.config, self.state, self.smtp_port, sink_port, "relay" if deliver else "accept",
                           processes=1, accounting=True, tail=tail)
        self.log = open(os.path.join(workdir, "twistd.out"), "ab")  # noqa: SIM115 (kept open beyond this block)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "pymta", "--config", self.config],
            cwd=workdir, env=dict(os.environ, PYTHONPATH=ROOT), stdout=self.log, stderr=self.log,
        )  # fmt: skip
        wait_port(self.smtp_port)
        wait_port(self.api_port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def post(port: int, batch: list[dict]) -> dict:
    body = json.dumps({"envelope_sender": "bounces@bench.example", "recipients": batch, "content": content(),
                       "substitutions": GLOBAL, "campaign": "bench"}).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/api/v1/inject", body, {"Authorization": f"Bearer {TOKEN}",
                                                      "Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200 or answer.get("fail_count"):
        raise SystemExit(f"injection failed: {resp.status} {str(answer)[:300]}")
    return answer


def parallel(work: list, conc: int, do) -> None:
    """Runs do(item) for every item over ``conc`` threads; the first error ends the bench."""
    items = list(work)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not items or errors:
                    return
                item = items.pop(0)
            try:
                do(item)
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    if errors:
        raise SystemExit(f"submission failed: {errors[0]!r}")


def smtp_messages(rcpts: list[dict]) -> list[tuple[str, bytes]]:
    """The messages pymta would build for these recipients, built here with its own builder."""
    from pymta.admin.http.inject import MessageBuilder

    class Wall:
        def seconds(self) -> float:
            return time.time()

    builder = MessageBuilder(content(), 10 << 20, Wall())
    return [(r["email"], builder.build(r["email"], "", {**GLOBAL, **r["substitutions"]})) for r in rcpts]


def submit_smtp(port: int, messages: list[tuple[str, bytes]], conc: int) -> None:
    slices = [messages[i::conc] for i in range(conc)]

    def session(part: list[tuple[str, bytes]]) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            for rcpt, data in part:
                client.sendmail("bounces@bench.example", [rcpt], data)

    parallel(slices, conc, session)


def one_run(mta: Pymta, way: str, n: int, tag: str, args: argparse.Namespace) -> dict:
    rcpts = recipients(n, tag)
    messages = smtp_messages(rcpts) if way == "smtp" else None
    if args.accept_only:
        workdir, sink_port = os.path.dirname(mta.config), mta.sink_port
        mta.stop()
        shutil.rmtree(mta.state, ignore_errors=True)
        mta.__init__(workdir, sink_port, deliver=False)
    wait_empty(mta.state)
    cpu0, t0 = cpu_seconds(mta.proc.pid), time.perf_counter()
    if way == "smtp":
        submit_smtp(mta.smtp_port, messages, args.smtp_conc)
    else:
        size = int(way.split("/")[1])
        parallel([rcpts[i : i + size] for i in range(0, n, size)], args.http_conc, lambda b: post(mta.api_port, b))
    accepted, cpu_accept = time.perf_counter() - t0, cpu_seconds(mta.proc.pid) - cpu0
    if args.accept_only:
        return {"accept_mps": n / accepted, "accept_cpu_ms": 1000 * cpu_accept / n, "e2e_mps": 0.0, "e2e_cpu_ms": 0.0}
    wait_empty(mta.state)
    e2e, cpu_all = time.perf_counter() - t0, cpu_seconds(mta.proc.pid) - cpu0
    return {"accept_mps": n / accepted, "accept_cpu_ms": 1000 * cpu_accept / n,
            "e2e_mps": n / e2e, "e2e_cpu_ms": 1000 * cpu_all / n}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, action="append", help="recipients per request (default 100 and 1000)")
    parser.add_argument("--http-conc", type=int, default=2)
    parser.add_argument("--smtp-conc", type=int, default=10)
    parser.add_argument("--accept-only", action="store_true", help="no delivery: measure the ways in only")
    args = parser.parse_args()
    ways = ["smtp"] + [f"http/{b}" for b in (args.batch or [100, 1000])]
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    workdir = tempfile.mkdtemp(prefix="pymta-inject-bench-")
    sink_port = free_port()
    sink_proc = subprocess.Popen([sink, "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "1024"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    mta = None
    try:
        wait_port(sink_port)
        mta = Pymta(workdir, sink_port, deliver=not args.accept_only)
        for way in ways:  # warm-up
            one_run(mta, way, min(1000, args.recipients), f"w{way.replace('/', '')}", args)
        results: dict[str, list[dict]] = {way: [] for way in ways}
        for run in range(args.runs):
            for way in ways:
                r = one_run(mta, way, args.recipients, f"{run}{way.replace('/', '')}", args)
                results[way].append(r)
                print(f"run {run + 1} {way:>9}: accept {r['accept_mps']:7.0f} msg/s {r['accept_cpu_ms']:6.2f} ms CPU/msg"
                      f"   end to end {r['e2e_mps']:7.0f} msg/s {r['e2e_cpu_ms']:6.2f} ms CPU/msg", flush=True)  # fmt: skip
        size = len(smtp_messages(recipients(1, "size"))[0][1])
        print(f"\nmedians of {args.runs} runs, {args.recipients} recipients of {size} octets, fsync on:")
        print("| way | accepted msg/s | CPU ms/msg accepting | end-to-end msg/s | CPU ms/msg end to end |")
        print("|---|---|---|---|---|")
        med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in results.items()}
        for way, m in med.items():
            print(f"| {way} | {m['accept_mps']:.0f} | {m['accept_cpu_ms']:.2f} | {m['e2e_mps']:.0f} | {m['e2e_cpu_ms']:.2f} |")
        for way in ways[1:]:
            e2e = "" if args.accept_only else f"end to end {med[way]['e2e_mps'] / med['smtp']['e2e_mps']:.2f}x, "
            print(f"{way} / smtp: accepted {med[way]['accept_mps'] / med['smtp']['accept_mps']:.2f}x, {e2e}"
                  f"CPU per message accepting {med[way]['accept_cpu_ms'] / med['smtp']['accept_cpu_ms']:.2f}x")  # fmt: skip
    finally:
        if mta is not None:
            mta.stop()
        sink_proc.terminate()
        sink_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
