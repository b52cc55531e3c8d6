#!/usr/bin/env python3
"""Fuzz the feedback parser with mutated corpus messages (hypothesis), with a time bound per input.

    python3 bench/fuzz_feedback.py [--corpus DIR] [--examples 100000] [--deadline-ms 5000]
    python3 bench/fuzz_feedback.py --parity     # does CR-only or CRLF change any result?

Every corpus message is a seed; hypothesis inserts, deletes, repeats and splices byte runs
(line breaks, '@', boundaries, field names, long runs). A parse that raises, returns something
that is not a Report, names a non-address or takes longer than the deadline fails the run and
hypothesis prints the (shrunk) input. At the end: examples run, the slowest parse and its size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pymta.feedback.parse import Report, parse_message

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS = [b"\n", b"\r", b"\r\n", b"@", b"<", b">", b":", b";", b"--", b"\n\n", b"Final-Recipient: rfc822; ",
          b"Status: 5.1.1\n", b"Action: failed\n", b"Content-Type: multipart/report; boundary=", b"=?utf-8?b?",
          b"\xff\xfe", b"\x00", b" ", b"A" * 64, b"received: from x for <", b"spf dkim "]  # fmt: skip


def load_corpus(path: str) -> list[bytes]:
    with open(os.path.join(path, "truth.jsonl"), encoding="utf-8") as f:
        files = [json.loads(line)["file"] for line in f if line.strip()]
    out = []
    for name in files:
        with open(os.path.join(path, name), "rb") as f:
            out.append(f.read())
    return out


def mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        raw = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 6))):
            pos = draw(st.integers(0, len(raw)))
            op = draw(st.sampled_from(["insert", "delete", "repeat", "splice", "truncate"]))
            chunk = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=24))
            if op == "insert":
                raw[pos:pos] = chunk
            elif op == "delete":
                del raw[pos : pos + draw(st.integers(1, 4096))]
            elif op == "repeat":
                raw[pos:pos] = chunk * draw(st.integers(2, 2_000))  # megabyte inputs: bench/parse_worst.py
            elif op == "splice":
                other = draw(st.sampled_from(seeds))
                start = draw(st.integers(0, len(other)))
                raw[pos:pos] = other[start : start + draw(st.integers(1, 8192))]
            else:
                del raw[pos:]
        return bytes(raw)

    return mutate()


def fuzz(seeds: list[bytes], examples: int, deadline_ms: int, seed: int) -> None:
    stats = {"n": 0, "slowest": 0.0, "size": 0}

    @settings(max_examples=examples, deadline=deadline_ms, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(mutations(seeds))
    @hypothesis_seed(seed)
    def run(raw: bytes) -> None:
        start = time.perf_counter()
        report = parse_message(raw)
        took = time.perf_counter() - start
        stats["n"] += 1
        if stats["n"] % 10_000 == 0:
            print(f"{stats['n']} examples, slowest so far {stats['slowest']:.3f} s", flush=True)
        if took > stats["slowest"]:
            stats["slowest"], stats["size"] = took, len(raw)
        assert isinstance(report, Report)
        assert report.kind in ("dsn", "arf", "autoreply", "reply", "unknown")
        assert len(report.recipients) <= 1000
        assert all("@" in a and " " not in a for a in report.recipients)

    started = time.perf_counter()
    run()
    print(f"examples: {stats['n']} in {time.perf_counter() - started:.0f} s; slowest parse {stats['slowest']:.3f} s "
          f"({stats['size']} bytes); deadline {deadline_ms} ms per input never exceeded")  # fmt: skip


def parity(seeds: list[bytes]) -> None:
    def key(r: Report) -> tuple:
        return r.kind, tuple(r.recipients), r.action, r.reason, r.hard, r.status

    lf = [key(parse_message(s.replace(b"\r\n", b"\n"))) for s in seeds]
    for name, ending in (("CRLF", b"\r\n"), ("CR-only", b"\r")):
        changed = sum(key(parse_message(s.replace(b"\r\n", b"\n").replace(b"\n", ending))) != k for s, k in zip(seeds, lf, strict=True))
        print(f"{name}: {changed} of {len(seeds)} results differ from LF")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "..", "shared", "corpus", "bounces"))
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--deadline-ms", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (runs in parallel use different ones)")
    ap.add_argument("--parity", action="store_true", help="compare LF, CRLF and CR-only results instead")
    a = ap.parse_args()
    seeds = load_corpus(a.corpus)
    if a.parity:
        parity(seeds)
    else:
        fuzz(seeds, a.examples, a.deadline_ms, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
