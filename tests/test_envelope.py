"""Queue ids: the arrival time they carry."""

from __future__ import annotations

from pymta.envelope import new_qid, qid_time


def test_a_queue_id_gives_back_its_arrival_time():
    for now in (1_700_000_000.123456, 2_000_000_000.0, 946_684_800.5):
        assert abs(qid_time(new_qid(now)) - now) < 1e-6


def test_a_name_new_qid_did_not_make_has_no_arrival_time():
    for name in ("0000000000000000BAD", "not-a-queue-id!", "", "Z" * 40, new_qid(1.5), "ZZZZZZZZZZZZZZZZZZZZZZ"):
        assert qid_time(name) is None


def _fields(qid: str) -> tuple[int, int]:
    """(process id bits, random bits) of a queue id new_qid made."""
    value = 0
    for c in qid:
        value = value * 32 + "0123456789ABCDEFGHJKLMNPQRSTVWXYZ".index(c)
    return (value >> 40) & 0xFFFF, value & 0xFFFFFF


def test_queue_ids_made_at_the_same_moment_in_a_forked_child_and_its_parent_differ():
    import os

    now = 1_800_000_000.0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out
        try:
            os.write(write, " ".join(new_qid(now) for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split()
    os.waitpid(pid, 0)
    parent = [new_qid(now) for _ in range(50)]
    assert len(child) == 50
    assert not set(child) & set(parent)
    assert {_fields(q)[0] for q in child} == {pid & 0xFFFF}
    assert {_fields(q)[0] for q in parent} == {os.getpid() & 0xFFFF}
    assert len({_fields(q)[1] for q in child + parent}) > 90  # random bits, not one sequence copied into the child
