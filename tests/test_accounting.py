"""The accounting log: one JSON line per event, on disk (fsynced) before the record's Deferred fires,
records group-committed, torn lines tolerated, reopened for logrotate."""

from __future__ import annotations

import errno
import json
import os

from twisted.internet import defer, task

from pymta.admin import accounting as accounting_module
from pymta.admin.accounting import AccountingLog, read_records


class HeldRunner:
    """Runs each write only when the test says so (a writer thread that is still busy)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[object, defer.Deferred]] = []

    def __call__(self, f):
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((f, d))
        return d

    def run_next(self) -> None:
        f, d = self.jobs.pop(0)
        d.callback(f())

    def run_all(self) -> None:
        while self.jobs:
            self.run_next()


def lines(path) -> list[str]:
    return path.read_text().splitlines()


def fired(d: defer.Deferred) -> list:
    out: list = []
    d.addCallback(out.append)
    return out


def test_a_record_is_fsynced_before_its_deferred_fires(tmp_path, monkeypatch):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    path = tmp_path / "log" / "accounting.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(accounting_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = AccountingLog(str(path), clock)
    done = fired(log.record("delivered", qid="Q1", recipient="a@b.example", reply={"code": 250}, tls=None, attempt=1))
    assert done == []
    assert path.read_text() == ""
    clock.advance(0)
    assert done == [True]
    assert len(synced) == 1
    [record] = [json.loads(x) for x in lines(path)]
    assert record["event"] == "delivered"
    assert record["qid"] == "Q1"
    assert record["time"].startswith("2023-11-14T22:13:20")
    assert "tls" not in record  # None fields are left out
    log.close()


def test_records_made_while_a_write_is_in_flight_share_the_next_write(tmp_path, monkeypatch):
    clock = task.Clock()
    runner = HeldRunner()
    synced: list[int] = []
    monkeypatch.setattr(accounting_module.os, "fsync", synced.append)
    path = tmp_path / "a.jsonl"
    log = AccountingLog(str(path), clock, run=runner)
    first = fired(log.record("received", qid="Q0"))
    clock.advance(0)
    later = [fired(log.record("received", qid=f"Q{i}")) for i in range(1, 51)]
    clock.advance(0)
    assert len(runner.jobs) == 1  # the first write is still running: the others wait for it, together
    runner.run_next()
    assert first == [True]
    assert all(x == [] for x in later)
    assert len(runner.jobs) == 1
    runner.run_next()
    assert all(x == [True] for x in later)
    assert len(synced) == 2
    assert [r["qid"] for r in read_records(str(path))] == [f"Q{i}" for i in range(51)]
    log.close()


def test_a_torn_last_line_does_not_corrupt_the_next_record(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"event": "received", "qid": "Q1"}\n{"event": "deliv')  # a crash mid-write
    clock = task.Clock()
    log = AccountingLog(str(path), clock)
    done = fired(log.record("delivered", qid="Q1"))
    clock.advance(0)
    log.close()
    assert done == [True]
    assert lines(path)[-1] == json.dumps({"time": "1970-01-01T00:00:00.000+00:00", "event": "delivered", "qid": "Q1"})
    assert [(r["event"], r["qid"]) for r in read_records(str(path))] == [("received", "Q1"), ("delivered", "Q1")]


def test_a_write_that_fails_half_way_is_reported_and_the_next_one_starts_a_new_line(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    clock = task.Clock()
    log = AccountingLog(str(path), clock)
    real_write = os.write
    calls: list[int] = []

    def disk_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accounting_module.os, "write", disk_full)
    lost = fired(log.record("delivered", qid="Q1", recipient="x@y.example"))
    clock.advance(0)
    assert lost == [False]
    monkeypatch.setattr(accounting_module.os, "write", real_write)  # space again
    kept = fired(log.record("delivered", qid="Q2"))
    clock.advance(0)
    log.close()
    assert kept == [True]
    assert [r["qid"] for r in read_records(str(path))] == ["Q2"]
    assert json.loads(lines(path)[-1])["qid"] == "Q2"


def test_reopen_starts_a_new_file_after_a_rename(tmp_path):
    path = tmp_path / "accounting.jsonl"
    clock = task.Clock()
    log = AccountingLog(str(path), clock)
    log.record("received", qid="Q1")
    clock.advance(0)
    os.rename(path, tmp_path / "accounting.jsonl.1")  # logrotate
    log.record("delivered", qid="Q1")  # still into the renamed file until reopened
    clock.advance(0)
    log.reopen()
    log.record("received", qid="Q2")
    clock.advance(0)
    log.close()
    assert [r["qid"] for r in read_records(str(tmp_path / "accounting.jsonl.1"))] == ["Q1", "Q1"]
    assert [r["qid"] for r in read_records(str(path))] == ["Q2"]


def test_without_fsync_nothing_is_fsynced(tmp_path, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(accounting_module.os, "fsync", synced.append)
    clock = task.Clock()
    log = AccountingLog(str(tmp_path / "a.jsonl"), clock, fsync=False)
    done = fired(log.record("received", qid="Q1"))
    clock.advance(0)
    log.close()
    assert done == [True]
    assert synced == []
    assert len(lines(tmp_path / "a.jsonl")) == 1


def test_records_pending_at_close_and_after_it_are_written(tmp_path):
    clock = task.Clock()
    path = tmp_path / "a.jsonl"
    log = AccountingLog(str(path), clock)
    pending = fired(log.record("deferred", qid="Q1"))
    log.close()
    late = fired(log.record("deferred", qid="Q2"))  # an attempt that ended during the shutdown
    assert pending == [True]
    assert late == [True]
    assert [r["qid"] for r in read_records(str(path))] == ["Q1", "Q2"]


def test_outcome_records_wait_the_window_for_company_and_a_received_record_ends_it(tmp_path, monkeypatch):
    clock = task.Clock()
    synced: list[int] = []
    monkeypatch.setattr(accounting_module.os, "fsync", synced.append)
    path = tmp_path / "a.jsonl"
    log = AccountingLog(str(path), clock, window=0.02)
    first = fired(log.record("delivered", qid="Q1"))
    clock.advance(0.01)
    second = fired(log.record("deferred", qid="Q2"))
    clock.advance(0.009)
    assert (first, second, synced) == ([], [], [])  # still inside the window: nothing written
    clock.advance(0.001)
    assert (first, second, len(synced)) == ([True], [True], 1)  # one write, one fsync for both
    outcome = fired(log.record("bounced", qid="Q3"))
    clock.advance(0.005)
    received = fired(log.record("received", qid="Q4"))  # a client waits on this one: no waiting
    clock.advance(0)
    assert (outcome, received, len(synced)) == ([True], [True], 2)
    assert [r["qid"] for r in read_records(str(path))] == ["Q1", "Q2", "Q3", "Q4"]
    late = fired(log.record("delivered", qid="Q5"))
    log.close()  # what still waits is written at close
    assert late == [True]
    assert [r["qid"] for r in read_records(str(path))][-1] == "Q5"


def test_without_a_window_every_record_goes_out_in_its_reactor_turn(tmp_path):
    clock = task.Clock()
    path = tmp_path / "a.jsonl"
    log = AccountingLog(str(path), clock)
    done = fired(log.record("delivered", qid="Q1"))
    clock.advance(0)
    assert done == [True]
    log.close()
