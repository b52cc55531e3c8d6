#!/usr/bin/env python3
"""Local acceptance while DNS is down: time from the final dot to 250 for local mail while relay
recipients wait on a resolver that never answers (a loopback UDP socket), then the time a
SIGTERM takes with those lookups still hanging.

Usage: python bench/dns_outage.py [--relay 200] [--local 20] [--grace 5]

Runs the real ``twistd -n pymta`` on 127.0.0.1 in a temporary directory. Bounded: --relay
recipients, --local messages, every wait has a limit.
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.mta_process import MTAProcess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relay", type=int, default=200, help="relay recipients, each in its own domain")
    parser.add_argument("--local", type=int, default=20, help="local messages timed")
    parser.add_argument("--grace", type=float, default=5.0, help="[queue] shutdown_grace, seconds")
    args = parser.parse_args()
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))
    with tempfile.TemporaryDirectory(prefix="pymta-dns-outage-") as work:
        config = (f'[dns]\nservers = ["127.0.0.1:{blackhole.getsockname()[1]}"]\ntimeout = "30s"\n'
                  f'[queue]\nshutdown_grace = "{args.grace}s"\n')  # fmt: skip
        mta = MTAProcess(work, extra_config=config).start()
        try:
            with smtplib.SMTP("127.0.0.1", mta.port, timeout=60) as client:
                for start in range(0, args.relay, 100):
                    rcpts = [f"r@remote{i}.test" for i in range(start, min(args.relay, start + 100))]
                    client.sendmail("s@example.org", rcpts, "Subject: relay\r\n\r\nbody\r\n")
            blackhole.settimeout(10)
            blackhole.recv(512)  # lookups are in flight
            times = []
            with smtplib.SMTP("127.0.0.1", mta.port, timeout=60) as client:
                client.ehlo("bench.example")
                for i in range(args.local):
                    for reply in (client.mail("s@example.org"), client.rcpt("alice@example.test")):
                        assert reply[0] == 250, reply
                    client.putcmd("DATA")
                    code, text = client.getreply()
                    assert code == 354, (code, text)
                    client.send(f"Subject: local {i}\r\n\r\nbody\r\n.\r\n".encode())
                    started = time.perf_counter()
                    code, text = client.getreply()
                    times.append(time.perf_counter() - started)
                    assert code == 250, (code, text)
            ms = sorted(t * 1000 for t in times)
            print(f"local final dot -> 250 with {args.relay} relay recipients on a dead resolver: "
                  f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms ({len(ms)} messages)")  # fmt: skip
            started = time.monotonic()
            mta.proc.send_signal(signal.SIGTERM)
            mta.proc.wait(args.grace + 30)
            print(f"SIGTERM to exit with those lookups hanging: {time.monotonic() - started:.2f} s "
                  f"(shutdown_grace {args.grace:g} s)")  # fmt: skip
        finally:
            mta.stop()
            blackhole.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
