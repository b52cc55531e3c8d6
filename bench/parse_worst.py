#!/usr/bin/env python3
"""How long ``parse_message`` takes on crafted inputs, and the slowest of them.

    python3 bench/parse_worst.py [--limit SECONDS] [--scale N]

Each input is parsed in a child process that is killed after ``--limit`` seconds (reported as
TIMEOUT), so a quadratic case cannot hang the run. ``--scale`` multiplies the sizes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable

HEAD = (
    "From: MAILER-DAEMON@mx.remote.test\r\nTo: news@sender.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
    "MIME-Version: 1.0\r\n"
)


def plain_bounce(body: str) -> bytes:
    return (HEAD + "\r\nThe following address failed:\r\n\r\n" + body + "\r\n").encode()


def dsn(diagnostic: str, recipients: int = 1, extra_headers: str = "") -> bytes:
    blocks = "".join(
        f"Final-Recipient: rfc822; user{i}@remote.test\r\nAction: failed\r\nStatus: 5.0.0\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        for i in range(recipients)
    )
    return (
        HEAD + extra_headers + 'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nsorry\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test\r\n\r\n"
        + blocks + "--B--\r\n"
    ).encode()


def nested(depth: int) -> bytes:
    out = HEAD
    for i in range(depth):
        out += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
    out += "Content-Type: text/plain\r\n\r\nuser@remote.test: 550 user unknown\r\n"
    for i in reversed(range(depth)):
        out += f"--b{i}--\r\n"
    return out.encode()


def cases(scale: int) -> dict[str, Callable[[], bytes]]:
    kb = 1024 * scale
    return {
        "address characters, 200 KB": lambda: plain_bounce("A" * 200 * kb),
        "base64 lines, 1 MB": lambda: plain_bounce(("QUJD" * 19 + "\r\n") * (13 * kb)),
        "address characters with @, 200 KB": lambda: plain_bounce(("a" * 63 + "@") * (3 * kb)),
        "@ signs, 500 KB": lambda: plain_bounce("@" * 500 * kb),
        "spf/dkim diagnostic, 16 KB": lambda: dsn("spf dkim " * (2 * kb)),
        "spf/dkim diagnostic, 800 KB": lambda: dsn("spf dkim " * (90 * kb)),
        "dashes line, 200 KB": lambda: plain_bounce("-" * 200 * kb),
        "unclosed html tags, 200 KB": lambda: (HEAD + "Content-Type: text/html\r\n\r\n" + "<" * 200 * kb).encode(),
        "subject header, 1 MB": lambda: (HEAD.replace("Subject: ", "Subject: " + "x " * 512 * kb) + "\r\nhi\r\n").encode(),
        "to header of addresses, 1 MB": lambda: (HEAD.replace("To: news@sender.test", "To: " + "a@b.cd, " * 128 * kb)
                                                 + "\r\nhi\r\n").encode(),
        "blank-looking lines, 500 KB": lambda: dsn("x", extra_headers="") .replace(b"Reporting-MTA", b"\n" + b" " * 500 * kb),
        "deep MIME nesting, 2000": lambda: nested(2000 * scale),
        "recipients, 5000": lambda: dsn("550 5.1.1 user unknown", recipients=5000 * scale),
        "CR-only line endings, 1 MB": lambda: plain_bounce("a@b.cd failed\r" * 70 * kb),
        "failure phrase then a 9 KB line of '<'": lambda: plain_bounce(("This is a permanent " + "<" * 9 * kb + "\r\n") * 3),
    }


def _run(name: str, scale: int, out: multiprocessing.Queue) -> None:
    from pymta.feedback.parse import parse_message

    raw = cases(scale)[name]()
    start = time.perf_counter()
    report = parse_message(raw)
    out.put((len(raw), time.perf_counter() - start, report.kind, len(report.recipients)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=60.0, help="seconds before a case counts as TIMEOUT")
    ap.add_argument("--scale", type=int, default=1)
    a = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    worst = ("", 0.0)
    print(f"{'input':38} {'bytes':>9} {'seconds':>8}  result")
    for name in cases(a.scale):
        out = ctx.Queue()
        proc = ctx.Process(target=_run, args=(name, a.scale, out))
        proc.start()
        proc.join(a.limit)
        if proc.is_alive():
            proc.kill()
            proc.join()
            print(f"{name:38} {'?':>9} {'TIMEOUT':>8}  killed after {a.limit:.0f} s")
            worst = max(worst, (name, a.limit), key=lambda w: w[1])
            continue
        size, seconds, kind, n = out.get(timeout=5)
        print(f"{name:38} {size:9d} {seconds:8.3f}  {kind}, {n} recipients")
        worst = max(worst, (name, seconds), key=lambda w: w[1])
    print(f"worst: {worst[0]}: {worst[1]:.3f} s")


if __name__ == "__main__":
    main()
