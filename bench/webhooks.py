"""Webhook throughput: events per second from the event journal to a receiver on loopback.

    python bench/webhooks.py [--events 20000] [--batch 1 --batch 100]
    python bench/webhooks.py --serve PORT          (the receiver alone, for bench/relay.sh)
    python bench/webhooks.py --compare RESULTS.jsonl   (relay end to end, webhooks on against off)
    python bench/webhooks.py --relay 2000 [--runs 3]   (relay end to end, webhooks on against off, here)

For each batch size: a fresh journal is filled with ``--events`` durable events, then the
webhook sender (treq, persistent connections, signed POSTs, the cursor fsynced after every
accepted batch) delivers them to a minimal twisted.web receiver in its own process, which
answers 200. Reported: events/s and POSTs/s from the first POST to the last accepted batch.
``--relay N``: N messages submitted over SMTP (10 sessions) to a fresh ``twistd pymta`` relaying to
smtp-sink, until its queue is empty, with a ``[[webhooks]]`` endpoint (batch_size 100, every event
kind) on the receiver above and without; runs interleaved (off, on) after a warm-up of each;
medians of end-to-end msgs/s and pymta's CPU per message, and the cost of webhooks.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RECEIVER = r"""
import sys
from twisted.internet import reactor
from twisted.web import resource, server

class Hook(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        return b"ok"

site = server.Site(Hook())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"receiver did not listen on {port}")


def run(batches: list[int], n: int, port: int) -> list[tuple[int, float, float]]:
    from twisted.internet import defer, reactor, task
    from twisted.python.threadpool import ThreadPool

    from pymta.events.journal import EventJournal
    from pymta.events.webhooks import WebhookService, treq_post

    results = []

    @defer.inlineCallbacks
    def main():
        pool = ThreadPool(2, 4, name="bench-io")
        pool.start()
        try:
            for batch in batches:
                with tempfile.TemporaryDirectory() as tmp:
                    journal = EventJournal(os.path.join(tmp, "journal"), reactor, threadpool=pool, reactor=reactor)
                    for i in range(n):
                        journal.emit("delivered", qid=f"Q{i:08d}", recipient=f"user{i}@example.test",
                                     sender="news@shop.example", campaign="bench",
                                     reply={"code": 250, "enhanced": "2.0.0", "text": "2.0.0 Ok: queued as X"})  # fmt: skip
                        if i % 1000 == 999:
                            yield journal.synced()
                    yield journal.synced()
                    hook = SimpleNamespace(name="bench", url=f"http://127.0.0.1:{port}/hook", secret="0123456789abcdef0123",
                                           secret_file=None, events=None, batch_size=batch, linger=1.0, timeout=30.0,
                                           max_age=86400.0, retry_initial=0.1, retry_max=1.0)  # fmt: skip
                    post = treq_post(reactor)
                    service = WebhookService((hook,), journal, os.path.join(tmp, "hooks"), reactor, post,
                                             reactor=reactor, threadpool=pool)  # fmt: skip
                    [sender] = service.senders
                    started = time.perf_counter()
                    service.startService()
                    while sender.cursor.seq < n:
                        yield task.deferLater(reactor, 0.01, lambda: None)
                        if time.perf_counter() - started > 600:
                            raise SystemExit("did not finish in 10 minutes")
                    elapsed = time.perf_counter() - started
                    yield service.stopService()
                    journal.close()
                    results.append((batch, n / elapsed, (n / batch) / elapsed))
        finally:
            pool.stop()

    def go():
        d = main()
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return results


def compare(path: str) -> None:
    """bench/relay.sh rows pymta/... against pymta-webhooks/...: end-to-end msgs/s and the cost."""
    from ratios import median, merged_runs

    rows = {label: rate for label, runs in merged_runs(path, "e2e_mps").items() if (rate := median(runs, "e2e_mps")) is not None}
    print("| config | pymta msgs/s | with webhooks | cost |")
    print("|---|---|---|---|")
    for (name, config), off in sorted(rows.items()):
        on = rows.get(("pymta-webhooks", config))
        if name == "pymta" and on is not None:
            print(f"| {config} | {off:.0f} | {on:.0f} | {100 * (off - on) / off:+.1f} % |")


def relay(n: int, runs: int, hook_port: int) -> None:
    import shutil
    import statistics

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inject import Pymta, cpu_seconds, smtp_messages, submit_smtp, wait_empty

    hooks = (f'[[webhooks]]\nname = "bench"\nurl = "http://127.0.0.1:{hook_port}/hook"\n'
             'secret = "bench-secret-0123456789"\nbatch_size = 100\n')  # fmt: skip
    sink_port = free_port()
    sink = subprocess.Popen([shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", "-u", "nobody", "-c",
                             f"127.0.0.1:{sink_port}", "1024"], stdout=subprocess.DEVNULL)  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    try:
        wait_port(sink_port)
        for run in range(runs + 1):  # the first round is the warm-up
            for way in ("off", "on"):
                workdir = tempfile.mkdtemp(prefix="pymta-webhooks-bench-")
                rcpts = [{"email": f"r{i}-{run}{way}@dest.example", "substitutions": {"first": "F", "n": i}}
                         for i in range(n)]  # fmt: skip
                messages = smtp_messages(rcpts)
                mta = Pymta(workdir, sink_port, extra=hooks if way == "on" else "")
                try:
                    cpu0, t0 = cpu_seconds(mta.proc.pid), time.perf_counter()
                    submit_smtp(mta.smtp_port, messages, 10)
                    wait_empty(mta.state)
                    rate, cpu = n / (time.perf_counter() - t0), 1000 * (cpu_seconds(mta.proc.pid) - cpu0) / n
                finally:
                    mta.stop()
                    shutil.rmtree(workdir, ignore_errors=True)
                label = "warm-up" if run == 0 else f"run {run}"
                print(f"{label} webhooks {way:>3}: {rate:7.1f} msg/s  {cpu:6.2f} ms CPU/msg", flush=True)
                if run:
                    results[way].append((rate, cpu))
    finally:
        sink.terminate()
        sink.wait(10)
    med = {way: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for way, v in results.items()}
    print(f"\nmedians of {runs} runs, {n} messages of ~5.6 KB, fsync on:")
    print("| webhooks | msgs/s end to end | CPU ms/msg |\n|---|---|---|")
    for way, (rate, cpu) in med.items():
        print(f"| {way} | {rate:.1f} | {cpu:.2f} |")
    print(f"cost of webhooks: {100 * (med['off'][0] - med['on'][0]) / med['off'][0]:+.1f} % msgs/s, "
          f"{100 * (med['on'][1] - med['off'][1]) / med['off'][1]:+.1f} % CPU per message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 100)")
    parser.add_argument("--serve", type=int, help="only run the receiver on this port")
    parser.add_argument("--compare", help="print webhooks on against off from bench/relay.sh's results.jsonl")
    parser.add_argument("--relay", type=int, help="relay this many messages end to end, webhooks on against off")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        os.execv(sys.executable, [sys.executable, "-c", RECEIVER, str(args.serve)])
    if args.compare:
        compare(args.compare)
        return
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        wait_port(port)
        if args.relay:
            relay(args.relay, args.runs, port)
            return
        for batch, events, posts in run(args.batch or [1, 100], args.events, port):
            print(f"batch_size {batch:>4}: {events:10.0f} events/s  {posts:8.0f} POSTs/s  ({args.events} events)")
    finally:
        receiver.terminate()
        receiver.wait(10)


if __name__ == "__main__":
    main()
