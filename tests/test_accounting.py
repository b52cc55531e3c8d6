"""The accounting log: one JSON line per event, flushed in groups on the clock."""

from __future__ import annotations

import json

from twisted.internet import task

from pymta.admin.accounting import AccountingLog


def test_records_are_json_lines_flushed_on_the_clock(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    path = tmp_path / "log" / "accounting.jsonl"
    log = AccountingLog(str(path), clock, flush_interval=0.5)
    log.record("delivered", qid="Q1", recipient="a@b.example", mx="mx.b.example [192.0.2.1]", reply={"code": 250},
               tls=None, attempt=1, queue_time=1.5)  # fmt: skip
    assert path.read_text() == ""  # buffered
    clock.advance(0.5)
    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert record["event"] == "delivered" and record["qid"] == "Q1" and record["time"].startswith("2023-11-14T22:13:20")
    assert "tls" not in record  # None fields are left out
    log.record("bounced", qid="Q2")
    log.close()
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["delivered", "bounced"]


def test_a_full_buffer_is_written_at_once(tmp_path):
    log = AccountingLog(str(tmp_path / "a.jsonl"), task.Clock(), max_buffer=3)
    for i in range(3):
        log.record("deferred", qid=f"Q{i}")
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3
    log.close()
