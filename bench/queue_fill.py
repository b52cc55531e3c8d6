#!/usr/bin/env python3
"""Fill a queue directory with N deferred messages through the store's own API (for queue_scale.py).

Usage: python bench/queue_fill.py --count 1000000 --dir STATE_DIR/queue [--size 2048] [--due-in 72000]

Every message is queued the way the store queues any message (``enqueue`` into hold/, then
``move`` to deferred/), with one deferred recipient and its next attempt ``--due-in`` seconds
ahead, so none becomes due while a benchmark runs. The fill runs with **fsync off** (the
store's ``fsync=False``) and calls the store synchronously (its thread-pool work runs inline):
it only prepares a benchmark, it is not how the MTA queues mail. Bounded by --count; prints
progress every 50,000 messages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.python.failure import Failure

from pymta.envelope import DEFERRED as R_DEFERRED
from pymta.envelope import ROUTE_RELAY, Envelope, Recipient, new_qid
from pymta.interfaces import DEFERRED, HOLD
from pymta.queue.store import MaildirQueueStore


class InlineReactor:
    """callFromThread runs at once: with InlinePool, the store's Deferreds fire before the call returns."""

    @staticmethod
    def callFromThread(f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class InlinePool:
    @staticmethod
    def callInThreadWithCallback(on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        try:
            result = f(*args, **kw)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


def body_of(size: int, n: int) -> bytes:
    head = f"From: bench@example.org\r\nTo: rcpt{n}@example.net\r\nSubject: deferred {n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(0, (size - len(head)) // len(line))


def fill(root: str, count: int, size: int, due_in: float, state: str = DEFERRED,
         recipient: str = "rcpt{n}@example.net", route: str = ROUTE_RELAY) -> list[str]:  # fmt: skip
    """Queue ``count`` messages under ``root`` in ``state`` (DEFERRED: one deferred recipient due in
    ``due_in`` seconds; INCOMING: a new message to ``recipient``); their queue ids."""
    store = MaildirQueueStore(root, InlineReactor(), InlinePool(), fsync=False)
    start = time.monotonic()
    now = time.time()
    errors: list[Failure] = []
    qids = []
    for n in range(count):
        rcpt = Recipient(recipient.format(n=n), route=route)
        envelope = Envelope(qid=new_qid(now - 3600), sender="bench@example.org", recipients=[rcpt],
                            arrival=now - 3600, size=size)  # fmt: skip
        if state == DEFERRED:
            rcpt.state, rcpt.attempts, rcpt.updated = R_DEFERRED, 1, now
            rcpt.reply = {"code": 451, "enhanced": "4.4.1", "text": "bench: try later"}
            envelope.attempts, envelope.next_attempt = 1, now + due_in
        store.enqueue(envelope, body_of(size, n), HOLD if state == DEFERRED else state).addErrback(errors.append)
        if state == DEFERRED:
            store.move(envelope.qid, DEFERRED).addErrback(errors.append)
        qids.append(envelope.qid)
        if errors:
            errors[0].raiseException()
        if n and n % 50_000 == 0:
            print(f"  {n} queued, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return qids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--dir", required=True, help="the queue directory (state_dir/queue)")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--due-in", type=float, default=72000.0)
    args = parser.parse_args()
    start = time.monotonic()
    fill(args.dir, args.count, args.size, args.due_in)
    took = time.monotonic() - start
    print(f"filled {args.count} deferred messages in {took:.1f} s ({args.count / max(took, 1e-9):.0f}/s)")


if __name__ == "__main__":
    main()
