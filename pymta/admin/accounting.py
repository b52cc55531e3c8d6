"""The accounting log: append-only JSON lines at state_dir/log/accounting.jsonl, one record per
event (received, delivered, deferred, bounced, expired, relayed), durable before the state it reports.

``record()`` returns a Deferred that fires once the line is written and fsynced. Records made in the
same reactor turn, or while the previous write is still in progress, share one write and one fsync
(group commit), done off the reactor thread. A line torn by a crash or a full disk is ended with a
newline before the next write, so it never corrupts the records after it; :func:`read_records` skips
it. ``reopen()`` (SIGUSR1/SIGHUP) starts a new file after logrotate has renamed the old one.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="pymta.admin.accounting")

# Runs a blocking function somewhere and returns a Deferred of its result (a thread pool in the
# MTA; synchronous in tests).
Runner = Callable[[Callable[[], Any]], defer.Deferred[Any]]


def run_here(f: Callable[[], Any]) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f)


# An envelope with this key set (by the process that queued it into incoming/) has no received
# records yet: the queue manager writes them when it first loads the message, and the queue file,
# fsynced before the 250, stands for them until then (a crash in between writes them at restart,
# possibly twice). The client's 250 then waits for one chain of fsyncs, not two, and the records
# share the delivery outcomes' commits.
RECEIVED_AT_PICKUP = "received_at_pickup"


def received_records(accounting: Any, envelope: Any, prompt: bool | None = None) -> list[defer.Deferred[Any]]:
    """One ``received`` record per recipient of ``envelope``, timed at its arrival."""
    tags = {k: envelope.extra[k] for k in ("campaign", "tenant", "metadata") if envelope.extra.get(k)}
    return [
        accounting.record("received", at=envelope.arrival, prompt=prompt, qid=envelope.qid, sender=envelope.sender,
                          recipient=r.address, size=envelope.size, client=envelope.client_address, route=r.route,
                          **tags)
        for r in envelope.recipients
    ]


def pending_received(accounting: Any, envelope: Any, prompt: bool | None = None) -> list[defer.Deferred[Any]]:
    """The received records its queuing process left to whoever loads ``envelope`` first
    (:data:`RECEIVED_AT_PICKUP`): written now. The flag leaves the envelope with them, so a
    rewrite of the file that waits for these records says they are on disk."""
    if not envelope.extra.pop(RECEIVED_AT_PICKUP, False) or accounting is None:
        return []
    return received_records(accounting, envelope, prompt)


# What the queue manager records of an attempt's outcome: these may wait a commit window
# (the MTA's is ACCOUNTING_WINDOW): at a steady rate they share fsyncs instead of taking one each.
OUTCOME_EVENTS = frozenset({"delivered", "deferred", "bounced", "expired"})
ACCOUNTING_WINDOW = 0.02


class AccountingLog:
    """``record(event, **fields)`` appends ``{"time", "event", ...fields}`` and returns a Deferred
    that fires with True once the record is on disk, False when it could not be written (the
    failure and the records are logged here, so callers that do not wait lose nothing silently)."""

    def __init__(self, path: str, clock: Any, run: Runner = run_here, fsync: bool = True, window: float = 0.0) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.clock = clock
        self.run = run
        self.fsync = fsync
        self._lock = threading.Lock()  # the file descriptor, between the writer thread and reopen/close
        self._fd: int | None = None
        self._torn = False  # the file may end inside a line: start the next write with a newline
        self._pending: list[tuple[str, defer.Deferred[Any]]] = []
        self._scheduled: Any = None
        self._scheduled_delay = 0.0
        self._prompt = False  # a pending record that somebody answers a client on
        self.window = window  # how long outcome records may wait for company (0: the reactor turn)
        self._busy = False
        self._closed = False
        with self._lock:
            self._open()

    # -- writing ----------------------------------------------------------------------------

    def record(self, event: str, *, at: float | None = None, prompt: bool | None = None, **fields: Any) -> defer.Deferred[Any]:
        """``at``: the record's time if not now; ``prompt``: commit at once (the default for
        anything but an outcome) rather than within the window."""
        now = self.clock.seconds() if at is None else at
        record = {"time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"  # JSON escapes any newline
        d: defer.Deferred[Any] = defer.Deferred()
        if self._closed:  # late in a shutdown: written at once, here
            self._write_now([(line, d)])
            return d
        self._pending.append((line, d))
        if event not in OUTCOME_EVENTS if prompt is None else prompt:
            self._prompt = True
        self._schedule()
        return d

    def _schedule(self, at_once: bool = False) -> None:
        """Everything recorded in this reactor turn goes out in the same write, and during a write,
        in the next one. Delivery outcomes alone may wait ``window`` for company (nobody answers a
        client on them; the queue only waits to write the recipients' new state); a received
        record goes at once and takes them along."""
        if self._busy or not self._pending:
            return
        delay = self.window if self.window and not self._prompt else 0.0
        if self._scheduled is not None:
            if delay or not self._scheduled_delay:
                return
            self._scheduled.cancel()  # a record that cannot wait: the window ends now
            self._scheduled = None
        if at_once and not delay:
            self._commit()
            return
        self._scheduled, self._scheduled_delay = self.clock.callLater(delay, self._commit), delay

    def _commit(self) -> None:
        self._scheduled = None
        if self._busy or not self._pending:
            return
        batch, self._pending, self._prompt = self._pending, [], False
        self._busy = True
        data = "".join(line for line, _ in batch).encode("utf-8")
        d = self.run(lambda: self._write(data))
        d.addBoth(self._committed, batch)

    def _committed(self, result: Any, batch: list[tuple[str, defer.Deferred[Any]]]) -> None:
        self._busy = False
        self._settle(result, batch)
        if not self._closed:
            self._schedule(at_once=True)  # what arrived during the write: one more group

    def _settle(self, result: Any, batch: list[tuple[str, defer.Deferred[Any]]]) -> None:
        failed = isinstance(result, Failure)
        if failed:
            log.error("cannot write {n} accounting record(s) to {path}: {why}", n=len(batch), path=self.path,
                      why=result.getErrorMessage(), records=[line.rstrip("\n") for line, _ in batch])  # fmt: skip
        for _, waiter in batch:
            waiter.callback(not failed)

    def _write(self, data: bytes) -> None:
        """(writer thread) Append and fsync one group of lines."""
        with self._lock:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            if self._torn:
                data = b"\n" + data
            self._torn = True
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
            self._torn = False
            if self._closed:  # a group that was in flight when the log closed
                os.close(self._fd)
                self._fd = None

    def _open(self) -> None:
        """(under the lock) Open the file for appending; a torn last line gets its newline first."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    self._torn = f.read(1) != b"\n"
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    # -- operations -------------------------------------------------------------------------

    def reopen(self) -> defer.Deferred[Any]:
        """Close the file and open ``path`` again (after logrotate renamed it)."""

        def reopen() -> None:
            with self._lock:
                if self._closed:
                    return
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._open()

        d = self.run(reopen)
        d.addCallback(lambda _: log.info("accounting log reopened: {path}", path=self.path, event="log_reopen"))
        d.addErrback(lambda f: log.error("cannot reopen the accounting log {path}: {why}", path=self.path,
                                         why=f.getErrorMessage()))  # fmt: skip
        return d

    def close(self) -> None:
        """Write what is still pending (here, synchronously) and close the file."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        batch, self._pending = self._pending, []
        with self._lock:
            self._closed = True
        if batch:
            self._write_now(batch)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write_now(self, batch: list[tuple[str, defer.Deferred[Any]]]) -> None:
        """Write a group synchronously (at close, and after it: records made late in a shutdown)."""
        try:
            self._write("".join(line for line, _ in batch).encode("utf-8"))
            result: Any = None
        except OSError as e:
            result = Failure(e)
        self._settle(result, batch)


def read_records(path: str) -> Iterator[dict[str, Any]]:
    """Every record of an accounting log; a torn or garbled line (crash, full disk) is skipped."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record
