"""Queue ids: the arrival time they carry."""

from __future__ import annotations

from pymta.envelope import new_qid, qid_time


def test_a_queue_id_gives_back_its_arrival_time():
    for now in (1_700_000_000.123456, 2_000_000_000.0, 946_684_800.5):
        assert abs(qid_time(new_qid(now)) - now) < 1e-6


def test_a_name_new_qid_did_not_make_has_no_arrival_time():
    for name in ("0000000000000000BAD", "not-a-queue-id!", "", "Z" * 40, new_qid(1.5), "ZZZZZZZZZZZZZZZZZZZZZZ"):
        assert qid_time(name) is None
