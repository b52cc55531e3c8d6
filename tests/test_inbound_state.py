"""The inbound state backends: the contract for the in-process fake and the SQLite ``local``
backend, and what only the SQLite one does (restarts, sweeping, failing open)."""

from __future__ import annotations

import os
import sqlite3
from typing import ClassVar

import pytest
from twisted.internet import task
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pymta.interfaces import IInboundState
from pymta.rate import parse_rate
from pymta.state.local import InboundStateError, LocalInboundState
from pymta.state.memory import MemoryInboundState
from tests.contract_inbound_state import TRIPLE, InboundStateContract, SharedInboundStateContract
from tests.fakes import Answered, LateInboundState, fired


class TestMemoryInboundState(InboundStateContract):
    def make_state(self, clock):
        return MemoryInboundState(clock)


class TestLateInboundState(InboundStateContract):
    """The fake of a state whose connection answers come late, each answered before it is read."""

    def test_the_late_state_itself_provides_the_interface(self, clock):
        assert verifyObject(IInboundState, LateInboundState(MemoryInboundState(clock)))

    def make_state(self, clock):
        late = LateInboundState(MemoryInboundState(clock))

        def answered(f, *args):
            answer = f(*args)
            late.answer()
            return fired(answer)

        return Answered(late, answered)


class TestLocalInboundState(SharedInboundStateContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path):
        self.path = str(tmp_path / "inbound.sqlite")

    def make_state(self, clock):
        return LocalInboundState(self.path, clock, owner=1001)

    def other_process(self, clock):
        return LocalInboundState(self.path, clock, owner=1002)


def test_triples_and_rates_survive_a_restart_and_connections_are_cleared(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    path = str(tmp_path / "inbound.sqlite")
    before = LocalInboundState(path, clock, owner=1)
    before.greylist(TRIPLE, 300, 3600, 86400)
    before.acquire_connection("k", 1)
    before.close()
    clock.advance(300)
    after = LocalInboundState(path, clock, owner=2)
    assert after.greylist(TRIPLE, 300, 3600, 86400) == 0.0
    assert not after.acquire_connection("k", 1)  # still counted until the node says it starts
    after.clear_connections()
    assert after.acquire_connection("k", 1)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_sweeping_forgets_rested_rates_and_expired_triples_and_bounds_the_table(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    state = LocalInboundState(str(tmp_path / "s.sqlite"), clock, max_greylist=3, sweep_every=10**9)
    for i in range(5):
        state.greylist((f"c{i}", "s", "r"), 300, 3600, 86400)
        clock.advance(1)
    state.take("messages", "k", parse_rate("1/s"))
    assert state.counts() == {"connections": 0, "rates": 1, "greylist": 5}
    state.sweep()
    assert state.counts()["greylist"] == 3  # the oldest went first
    assert state.greylist(("c4", "s", "r"), 300, 3600, 86400) > 0
    assert state.counts()["greylist"] == 3
    clock.advance(3600)
    state.sweep()
    assert state.counts() == {"connections": 0, "rates": 0, "greylist": 0}


def test_sweeps_happen_by_themselves_every_so_many_writes(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    state = LocalInboundState(str(tmp_path / "s.sqlite"), clock, sweep_every=4)
    state.take("messages", "k", parse_rate("1/s"))
    clock.advance(10)
    for i in range(3):
        state.acquire_connection(f"k{i}", 5)
    assert state.counts()["rates"] == 0


def test_a_locked_database_fails_open_without_waiting_longer_than_the_busy_timeout(tmp_path):
    clock = task.Clock()
    path = str(tmp_path / "s.sqlite")
    state = LocalInboundState(path, clock, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert state.acquire_connection("k", 0) is True  # allowed: the store could not answer
        assert state.take("messages", "k", parse_rate("1/h")) == 0.0
        assert state.greylist(TRIPLE, 300, 3600, 86400) == 0.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert state.acquire_connection("k", 0) is False  # answering again


def test_an_unusable_path_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(InboundStateError, match=r"^.*/missing/dir/s\.sqlite: cannot open"):
        LocalInboundState(str(tmp_path / "missing" / "dir" / "s.sqlite"), task.Clock())


def test_after_close_nothing_is_counted_and_nothing_raises(tmp_path):
    state = LocalInboundState(str(tmp_path / "s.sqlite"), task.Clock())
    state.close()
    state.release_connection("k")
    assert state.acquire_connection("k", 1) is True


def test_a_listener_worker_that_ends_has_its_counted_connections_released(tmp_path):
    from pymta.workers import WorkerPool

    class Process:
        def __init__(self, pid):
            self.pid = pid

    class Reactor(task.Clock):
        workers: ClassVar[list] = []

        def spawnProcess(self, proto, *args, **kw):
            self.workers.append(proto)
            return Process(4242)

    clock = Reactor()
    main = LocalInboundState(str(tmp_path / "s.sqlite"), clock, owner=1)
    worker = LocalInboundState(str(tmp_path / "s.sqlite"), clock, owner=4242)
    pool = WorkerPool(clock, 1, "pymta.toml", [], on_ended=main.release_owner)
    pool.startService()
    assert worker.acquire_connection("k", 1)
    assert not main.acquire_connection("k", 1)
    # The worker dies (SIGKILL, crash): its sessions are gone with it.
    clock.workers[0].processEnded(Failure(ProcessTerminated(signal=9)))
    assert main.acquire_connection("k", 1)
    pool.stopService()


def test_a_damaged_database_is_put_aside_and_started_afresh(tmp_path):
    path = tmp_path / "inbound.sqlite"
    path.write_bytes(b"this is not a database\n" * 200)
    state = LocalInboundState(str(path), task.Clock())
    assert state.acquire_connection("k", 1)
    assert not state.acquire_connection("k", 1)
    assert (tmp_path / "inbound.sqlite.damaged").read_bytes().startswith(b"this is not a database")
