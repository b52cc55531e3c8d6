"""Bounces are parsed in a worker process with a time limit; the reactor only sees the result."""

from __future__ import annotations

import os
import queue
import time
from typing import Any

import pytest
from twisted.internet import task

from pymta.envelope import Envelope, Recipient, new_qid
from pymta.feedback.parse import Report, parse_message
from pymta.feedback.pool import ParsePool
from pymta.feedback.processor import FeedbackProcessor

DSN = (
    b"From: MAILER-DAEMON@mx.remote.test\nTo: news@sender.test\nSubject: Undelivered Mail Returned to Sender\n"
    b'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
    b"--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.remote.test\n\n"
    b"Final-Recipient: rfc822; carol@remote.test\nAction: failed\nStatus: 5.1.1\n--B--\n"
)


def worker_pid(raw: bytes) -> Report:
    """Runs in the worker: says which process parsed and how much it was given."""
    return Report(kind="dsn", diagnostic=f"{os.getpid()} {len(raw)}")


def hang(raw: bytes) -> Report:
    time.sleep(300)
    return Report()


class ThreadedClock(task.Clock):
    """A task.Clock whose callFromThread queues the call until the test runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.from_threads.put((f, args))

    def run_from_threads(self, d: Any, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while not d.called and time.monotonic() < deadline:
            try:
                f, args = self.from_threads.get(timeout=0.1)
            except queue.Empty:
                continue
            f(*args)


@pytest.fixture
def clock():
    return ThreadedClock()


def result_of(d: Any) -> Any:
    out: list[Any] = []
    d.addCallback(out.append)
    assert out, "deferred has not fired"
    return out[0]


def test_a_report_is_parsed_in_another_process(clock):
    pool, probe = ParsePool(clock), ParsePool(clock, function=worker_pid, max_bytes=100)
    try:
        d = pool.parse(DSN)
        clock.run_from_threads(d)
        report = result_of(d)
        assert (report.kind, report.recipients, report.reason) == ("dsn", ["carol@remote.test"], "userunknown")
        d = probe.parse(b"x" * 1000)
        clock.run_from_threads(d)
        pid, size = result_of(d).diagnostic.split()
        assert int(pid) != os.getpid()
        assert size == "100"
    finally:
        pool.close()
        probe.close()


def test_a_parse_past_its_time_limit_is_unknown_and_the_worker_is_ended(clock):
    pool = ParsePool(clock, timeout=5.0, function=hang)
    try:
        d = pool.parse(DSN)
        deadline = time.monotonic() + 30
        while not pool._executor._processes and time.monotonic() < deadline:  # the worker has started
            time.sleep(0.05)
        workers = list(pool._executor._processes.values())
        assert not d.called
        clock.advance(5.0)
        assert result_of(d).kind == "unknown"
        deadline = time.monotonic() + 30
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(w.is_alive() for w in workers)
        pool.function = parse_message
        d = pool.parse(DSN)  # a fresh pool serves the next one
        clock.run_from_threads(d)
        assert result_of(d).recipients == ["carol@remote.test"]
    finally:
        pool.close()


def test_the_processor_waits_for_the_parser(tmp_path):
    from twisted.internet import defer

    pending: defer.Deferred = defer.Deferred()
    processor = FeedbackProcessor(None, None, complaint_addresses=("fbl@sender.test",), parser=lambda raw: pending)
    results: list[Any] = []
    envelope = Envelope(qid=new_qid(), sender="", recipients=[])
    processor.deliver(envelope, [Recipient("fbl@sender.test", route="feedback")], DSN).addCallback(results.extend)
    assert results == []
    pending.callback(parse_message(DSN))
    assert [r.text for r in results] == ["feedback processed: ignored: not a complaint report"]
