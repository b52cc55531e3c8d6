"""The event journal: append-only, fsynced JSON-lines segments under ``state_dir/events/journal``.

Events emitted in one reactor turn (or within ``commit_delay`` of the first) share one write and
one fsync (group commit), done on the I/O thread pool when one is given. ``synced()`` fires once everything emitted before the call is
on disk. Segments are named by the sequence number of their first record and are removed once
every reader (webhook cursor) is past them. After a crash a torn last line (never acknowledged:
it was not fsynced) is cut off at start-up.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger(namespace="pymta.events")

SEGMENT_SIZE = 16 * 1024 * 1024
COMMIT_DELAY = 0.02  # the MTA's group commit window: at a moderate rate events share fsyncs, not one each
MAX_LINE = 1024 * 1024  # a longer line is not ours: skipped when read


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.jsonl"


class EventJournal:
    """``emit(type, **fields)`` appends one record; ``synced()`` waits for the fsync."""

    def __init__(self, directory: str, clock: Any, threadpool: Any = None, reactor: Any = None,
                 segment_size: int = SEGMENT_SIZE, commit_delay: float = 0.0) -> None:  # fmt: skip
        self.directory = directory
        self.commit_delay = commit_delay  # how long the first record waits for others to share its fsync
        self.clock = clock
        self.threadpool = threadpool
        self.reactor = reactor
        self.segment_size = segment_size
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.segments: list[int] = sorted(
            int(name[:-6]) for name in os.listdir(directory) if name.endswith(".jsonl") and name[:-6].isdigit()
        )
        self.last_seq = self._recover()
        self.durable_seq = self.last_seq
        self._pending: list[tuple[int, str]] = []
        self._writing: defer.Deferred[Any] | None = None
        self._waiters: list[tuple[int, defer.Deferred[Any]]] = []
        self._call: Any = None
        self._file: Any = None
        self._file_size = 0
        self._positions: dict[int, tuple[int, int]] = {}  # seq -> (segment, offset after it)
        self.listeners: list[Callable[[int], Any]] = []  # told the new durable_seq after each fsync
        self.closed = False

    # -- start-up ---------------------------------------------------------------------------

    def _recover(self) -> int:
        """The last complete record's seq; a torn tail is truncated."""
        while self.segments:
            path = self._path(self.segments[-1])
            with open(path, "rb+") as f:
                data = f.read()
                good = data.rfind(b"\n") + 1
                if good != len(data):
                    log.warn("event journal {path}: cut a torn last record of {n} bytes", path=path,
                             n=len(data) - good)  # fmt: skip
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            lines = data[:good].splitlines()
            for line in reversed(lines):
                try:
                    return int(json.loads(line)["seq"])
                except (ValueError, KeyError, TypeError):
                    continue
            if self.segments[-1] > 1 or len(self.segments) > 1:
                return self.segments[-1] - 1
            os.unlink(path)
            self.segments.pop()
        return 0

    def _path(self, first_seq: int) -> str:
        return os.path.join(self.directory, _segment_name(first_seq))

    # -- writing ----------------------------------------------------------------------------

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Append a record (fields that are None are left out); returns it."""
        if self.closed:
            raise RuntimeError("the event journal is closed")
        self.last_seq += 1
        now = self.clock.seconds()
        record: dict[str, Any] = {
            "seq": self.last_seq,
            "event_id": secrets.token_hex(16),
            "type": type_,
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        }
        record.update((k, v) for k, v in fields.items() if v is not None and k not in record)
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))
        self._pending.append((self.last_seq, line))
        if self._call is None and self._writing is None:
            self._call = self.clock.callLater(self.commit_delay, self._flush)
        return record

    def synced(self) -> defer.Deferred[Any]:
        """Fires when every record emitted so far is fsynced (errback if the write failed)."""
        wanted = self.last_seq
        if wanted <= self.durable_seq:
            return defer.succeed(None)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append((wanted, d))
        return d

    def _flush(self) -> None:
        self._call = None
        if self._writing is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        upto = batch[-1][0]
        if self.threadpool is not None and self.reactor is not None:
            d = threads.deferToThreadPool(self.reactor, self.threadpool, self._write, batch)
        else:
            d = defer.maybeDeferred(self._write, batch)
        self._writing = d
        d.addCallbacks(self._written, self._failed, callbackArgs=(upto,), errbackArgs=(batch,))

    def _write(self, batch: list[tuple[int, str]]) -> None:
        """On the I/O thread: write, rotating segments at ``segment_size``; fsync."""
        new_dir_entry = False
        data: list[str] = []
        for seq, line in batch:
            if self._file is None or self._file_size >= self.segment_size:
                if data:
                    self._append("".join(data))
                    data = []
                self._open_segment(seq)
                new_dir_entry = True
            data.append(line + "\n")
            self._file_size += len(line) + 1
        if data:
            self._append("".join(data))
        os.fsync(self._file.fileno())
        if new_dir_entry:
            fsync_dir(self.directory)

    def _append(self, text: str) -> None:
        self._file.write(text.encode("utf-8"))
        self._file.flush()

    def _open_segment(self, first_seq: int) -> None:
        if self._file is None and self.segments:
            path = self._path(self.segments[-1])
            size = os.path.getsize(path)
            if size < self.segment_size:
                self._file = open(path, "ab")  # noqa: SIM115 (kept open beyond this block)
                self._file_size = size
                return
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
        self._file = open(self._path(first_seq), "ab")  # noqa: SIM115 (kept open beyond this block)
        self._file_size = 0
        self.segments.append(first_seq)

    def _written(self, _: Any, upto: int) -> None:
        self._writing = None
        self.durable_seq = upto
        ready = [d for seq, d in self._waiters if seq <= upto]
        self._waiters = [(seq, d) for seq, d in self._waiters if seq > upto]
        for d in ready:
            d.callback(None)
        for listener in self.listeners:
            try:
                listener(upto)
            except Exception:
                log.failure("event journal listener failed")
        if self._pending:
            self._flush()

    def _failed(self, failure: Any, batch: list[tuple[int, str]]) -> None:
        # Keep the records for the next attempt; whoever waits is told (the queue manager then
        # leaves the recipient's state as it was, so the attempt and its event come again).
        self._writing = None
        log.error("cannot write the event journal {dir}: {why}", dir=self.directory, why=failure.getErrorMessage())
        self._pending = batch + self._pending
        waiting, self._waiters = self._waiters, []
        for _, d in waiting:
            d.errback(failure)
        if self._call is None and not self.closed:
            self._call = self.clock.callLater(1.0, self._flush)

    # -- reading ----------------------------------------------------------------------------

    def read(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` durable records with seq > ``after_seq``, in order. Where the last read
        ended is remembered, so a reader following the journal does not rescan a segment."""
        out: list[dict[str, Any]] = []
        if after_seq >= self.durable_seq or not self.segments:
            return out
        start, offset = self._positions.get(after_seq, (None, 0))
        if start is None or start not in self.segments:
            start = self.segments[max(0, bisect.bisect_right(self.segments, after_seq + 1) - 1)]
            offset = 0
        for first in self.segments[self.segments.index(start):]:
            try:
                f = open(self._path(first), "rb")  # noqa: SIM115 (kept open beyond this block)
            except FileNotFoundError:
                continue
            with f:
                f.seek(offset if first == start else 0)
                end = f.tell()
                while True:
                    line = f.readline(MAX_LINE + 1)
                    if not line.endswith(b"\n"):
                        break  # the end (or a line too long to be ours)
                    end = f.tell()
                    try:
                        record = json.loads(line)
                        seq = int(record["seq"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if seq <= after_seq:
                        continue
                    if seq > self.durable_seq:
                        return out
                    out.append(record)
                    if len(out) >= limit:
                        self._remember(seq, first, f.tell())
                        return out
            if out:
                self._remember(out[-1]["seq"], first, end)
        return out

    def _remember(self, seq: int, segment: int, offset: int) -> None:
        self._positions[seq] = (segment, offset)
        while len(self._positions) > 64:
            self._positions.pop(next(iter(self._positions)))

    def prune(self, done_seq: int) -> None:
        """Remove segments whose every record has seq <= ``done_seq`` (never the open one)."""
        while len(self.segments) > 1 and self.segments[1] <= done_seq + 1:
            first = self.segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(first))

    def close(self) -> None:
        """Writes what is pending (in-line: the reactor is stopping) and closes."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pending and self._writing is None:
            batch, self._pending = self._pending, []
            try:
                self._write(batch)
                self.durable_seq = batch[-1][0]
            except OSError as e:
                log.error("cannot write the event journal {dir}: {why}", dir=self.directory, why=str(e))
        self.closed = True
        if self._file is not None and self._writing is None:
            self._file.close()
            self._file = None
