"""Queue stores: the durable maildir-style spool and the in-memory fake, both behind IQueueStore.

Layout of the maildir store under ``root`` (state_dir/queue)::

    tmp/                 files being written (deleted by recover)
    incoming/<qid>       one queue file per message (pymta.queue.qfile: body + envelope records)
    active/ hold/ corrupt/   the same, one directory per queue state
    deferred/<h>/<h>/<qid>   hashed by a CRC of the qid (16 ** hash_depth subdirectories)

A message is created once (tmp/ -> fsync -> rename into incoming/ -> directory fsync); its
envelope changes are appended to its own file and fsynced; state changes are renames. A queue
of the previous layout (JSON envelopes + data/<qid> bodies) is migrated by recover().

Callers serialise the operations on one qid (wait for one Deferred before the next change of
the same message); different qids may be worked on concurrently. Another process may share
the directory (a listener-only process and a delivery process): lookups fall back to the
disk when the in-memory index is stale. ``recover()`` must run only while no other process
writes to the queue (it deletes what looks unfinished).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import os
import random
import re
import threading
import zlib
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from pymta.envelope import Envelope, qid_time
from pymta.fsio import DirSyncer, FileOps, NoSyncFileOps, discard, is_space_error, write_new_file
from pymta.interfaces import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    QUEUE_STATES,
    IQueueStore,
    QueueError,
    QueueFull,
)
from pymta.queue import qfile

log = Logger()

# A qid becomes a file name: only these names are accepted (new_qid() produces a subset).
_SAFE_QID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")

# What recovery hands on per sound message: (qid, state, due wall time, arrival wall time).
Recovered = tuple[str, str, float, float]
_GONE = "gone"
_STALE = "stale name"  # _check_file: the file is queued under another name too (see MaildirQueueStore)


class OtherQueueId(ValueError):
    """A queue file whose envelope names another queue id than the file's name."""


RECOVER_COUNTS = (
    "tmp_removed", "requeued", "corrupt", "torn_body", "missing_body", "orphan_bodies", "torn_records",
    "migrated", "queued", "quarantined", "in_corrupt",
)  # fmt: skip


def check_qid(qid: str) -> str:
    """Return ``qid`` if it is usable as a file name, else raise ValueError."""
    if not isinstance(qid, str) or not _SAFE_QID.match(qid):
        raise ValueError(f"unsafe queue id {qid!r}")
    return qid


def check_state(state: str) -> str:
    if state not in QUEUE_STATES:
        raise ValueError(f"unknown queue state {state!r}")
    return state


def new_counts() -> dict[str, int]:
    return dict.fromkeys(RECOVER_COUNTS, 0)


def check_enqueue_state(state: str) -> str:
    """New mail goes into INCOMING, or straight into HOLD (quarantine)."""
    if state not in (INCOMING, HOLD):
        raise ValueError(f"a new message cannot be queued in state {state!r}")
    return state


@implementer(IQueueStore)
class MemoryQueueStore:
    """In-memory IQueueStore for tests: same behaviour as the maildir store, Deferreds already fired.

    Envelopes are kept as their JSON, so a caller mutating an Envelope after handing it over
    (or after ``load``) does not change what is stored: exactly like the disk store.
    Set ``fail_with`` to an exception instance (e.g. ``QueueFull()``) to make every
    writing call (enqueue, update, move, remove) fail with it until it is reset to None.
    """

    def __init__(self) -> None:
        self._envelopes: dict[str, bytes] = {}
        self._bodies: dict[str, bytes] = {}
        self._states: dict[str, str] = {}
        self.fail_with: Exception | None = None

    def _write(self, qid: str, action: Callable[[], Any]) -> defer.Deferred[Any]:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        try:
            return defer.succeed(action())
        except Exception:
            return defer.fail()

    def enqueue(self, envelope: Envelope, body: bytes, state: str = INCOMING) -> defer.Deferred[Any]:
        qid = envelope.qid
        check_enqueue_state(state)

        def action() -> str:
            check_qid(qid)
            if qid in self._states:
                raise QueueError(f"queue id {qid} already queued")
            self._envelopes[qid] = envelope.to_json()
            self._bodies[qid] = bytes(body)
            self._states[qid] = state
            return qid

        return self._write(qid, action)

    def enqueue_many(self, items: builtins.list[tuple[Envelope, bytes]], state: str = INCOMING) -> defer.Deferred[Any]:
        try:
            check_enqueue_state(state)
        except ValueError:
            return defer.fail()
        results: builtins.list[Any] = []
        for envelope, body in items:
            self.enqueue(envelope, body, state).addCallbacks(results.append, lambda f: results.append(f.value))
        return defer.succeed(results)

    def load(self, qid: str) -> Envelope:
        return Envelope.from_json(self._envelopes[qid])

    def read_body(self, qid: str) -> bytes:
        return self._bodies[qid]

    def load_message(self, qid: str) -> tuple[Envelope, bytes]:
        return self.load(qid), self.read_body(qid)

    def state(self, qid: str) -> str | None:
        return self._states.get(qid)

    def update(self, envelope: Envelope) -> defer.Deferred[Any]:
        def action() -> None:
            if envelope.qid not in self._states:
                raise KeyError(envelope.qid)
            self._envelopes[envelope.qid] = envelope.to_json()

        return self._write(envelope.qid, action)

    def move(self, qid: str, state: str) -> defer.Deferred[Any]:
        def action() -> None:
            check_state(state)
            if qid not in self._states:
                raise KeyError(qid)
            self._states[qid] = state

        return self._write(qid, action)

    def remove(self, qid: str, durable: bool = True) -> defer.Deferred[Any]:
        def action() -> None:
            for table in (self._states, self._envelopes, self._bodies):
                table.pop(qid, None)

        return self._write(qid, action)

    def list(self, state: str) -> list[str]:
        check_state(state)
        return sorted(q for q, s in self._states.items() if s == state)

    def recover(self) -> dict[str, int]:
        counts = new_counts()
        for qid in self.list(ACTIVE):
            self._states[qid] = INCOMING
            counts["requeued"] += 1
        counts["queued"] = sum(1 for s in self._states.values() if s != CORRUPT)
        counts["in_corrupt"] = len(self._states) - counts["queued"]
        return counts

    def recover_incrementally(self, on_batch: Callable[[builtins.list[Recovered]], Any]) -> defer.Deferred[Any]:
        counts = self.recover()
        batch = []
        for state in (INCOMING, DEFERRED, HOLD):
            for qid in self.list(state):
                envelope = self.load(qid)
                batch.append((qid, state, max(envelope.next_attempt, envelope.not_before), envelope.arrival))
        if batch:
            on_batch(batch)
        return defer.succeed(counts)


def _translated(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an OSError escaping ``func`` into QueueFull (no space) or QueueError (anything else)."""

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        try:
            return func(*args)
        except OSError as e:
            if is_space_error(e):
                raise QueueFull(str(e)) from e
            raise QueueError(str(e)) from e

    return wrapper


def due_time(envelope: Envelope) -> float:
    """When ``envelope`` is next due (wall time; 0: now): kept as its queue file's mtime."""
    return max(envelope.next_attempt, envelope.not_before)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def hash_dirs(qid: str, depth: int) -> tuple[str, ...]:
    """The hashed subdirectories of ``qid`` (one hex digit per level, from a CRC of the qid: queue
    ids begin with their arrival time, so their first characters do not spread)."""
    return tuple(f"{zlib.crc32(qid.encode()):08x}"[:depth])


INLINE_UNLINK_MAX = 256 * 1024  # larger files are unlinked on the writing thread (see remove)
SPARE_RELOOK = 64  # a store that found spare/ empty (or full) looks again after this many tries
SPARE_TRIES = 8  # claims lost to other processes before a placement creates a file after all
_RDWR = os.O_RDWR | os.O_CLOEXEC
_RDONLY = os.O_RDONLY | os.O_CLOEXEC
_HEX = "0123456789abcdef"


@implementer(IQueueStore)
class MaildirQueueStore:
    """The durable spool: one self-validating file per message (:mod:`pymta.queue.qfile`), renamed
    between state directories, envelope changes appended in place, fsynced off the reactor.

    Commits share directory fsyncs (:class:`pymta.fsio.DirSyncer`): with N concurrent
    enqueues, each does its own file fsync in a pool thread and the directory fsyncs are done
    about twice per batch instead of N times. ``fsync=False`` drops every fsync (not durable).
    ``ops`` replaces the file-system primitives (tests record and break them). States in
    ``HASHED_STATES`` spread their files over ``16 ** hash_depth`` subdirectories (Postfix's
    ``hash_queue_depth``), so a million deferred messages make no million-entry directory.
    A file's mtime is its message's due time (set with each write, before its fsync; as
    Postfix's qmgr reads deferred/), so the MTA's start reads deferred/ with a stat per message.
    A move into active/ and a removal without durability are one rename or unlink each, done on
    the caller's thread: cheaper than the hop to the writing thread and back.

    With ``spares``, a finished message's file (removed without durability from active/, at most
    INLINE_UNLINK_MAX octets) is renamed into ``spare/`` instead of unlinked, while fewer than
    ``spares`` wait there, and a new message is written over a spare file instead of a new one (as
    PostgreSQL recycles WAL segments). On ext4 freeing an inode and allocating one after many
    deletions cost far more kernel time than two renames. No extra fsync: a journalling file
    system commits the renames that retired and claimed a spare before the directory fsync that
    acknowledges the message written over it. Where one could come back after a crash (no
    journal: fsck then counts both names), the old name is a second link to the new message's
    file: a claim skips a spare with more than one link, and recovery unlinks a queued name whose
    file holds another queue id and has another link, instead of delivering it twice.
    With ``space_low`` (a callable), while it answers true no file is kept and spare/ is emptied:
    spares must never be what makes the listeners refuse mail for want of room.
    """

    HASHED_STATES = (DEFERRED,)

    def __init__(
        self,
        root: str,
        reactor: Any,
        threadpool: Any,
        fsync: bool = True,
        ops: FileOps | None = None,
        hash_depth: int = 2,
        spares: int = 0,
        space_low: Callable[[], bool] | None = None,
    ) -> None:
        self.root = root
        self._reactor = reactor
        self._threadpool = threadpool
        self._ops = ops or (FileOps() if fsync else NoSyncFileOps())
        self.syncer = DirSyncer(self._ops)  # public for measurements (fsyncs, waiting)
        self.hash_depth = hash_depth
        self.quarantined = 0  # messages this store moved to corrupt/ (recovery and reads)
        self._tmp = os.path.join(root, "tmp")
        self.spares = spares  # finished queue files kept in spare/ for reuse, at most (0: none)
        self._spare_dir = os.path.join(root, "spare")
        self._spare_names: builtins.list[str] = []  # seen in spare/, not yet tried (writing threads pop)
        self._spare_lock = threading.Lock()
        self._spare_misses = 0  # placements since spare/ was found empty (0: look when needed)
        self._spare_kept: int | None = None  # what spare/ holds as far as this store knows (None: unknown)
        self._spare_full_tries = 0
        # Whether the file system is short of room (tap.spare_space_low): then no file is kept and
        # the spares are unlinked, so that they never make the listeners refuse mail.
        self.space_low = space_low
        self._releasing = False
        self._legacy_data = os.path.join(root, "data")  # bodies of a queue written before the one-file format
        self._dirs = {state: os.path.join(root, state) for state in QUEUE_STATES}
        self._index: dict[str, str] = {}  # qid -> state of what this store moved or found; the disk wins
        self._seq = itertools.count(1)
        self._make_dirs()  # the index fills as messages are queued, looked up and recovered

    # -- helpers

    def _make_dirs(self) -> None:
        made = set()
        for path in (self.root, self._tmp, *self._dirs.values()):
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                made.add(os.path.dirname(path))
        if self.spares and not os.path.isdir(self._spare_dir):
            try:
                os.mkdir(self._spare_dir, 0o700)
                made.add(self.root)
            except OSError as e:  # spares are an economy, not a need: the queue works without them
                log.warn("no spare queue files: cannot make {path}: {why}", path=self._spare_dir, why=e.strerror)
        for state in self.HASHED_STATES:
            for sub in itertools.product(_HEX, repeat=self.hash_depth):
                path = os.path.join(self._dirs[state], *sub)
                if not os.path.isdir(path):
                    os.makedirs(path, mode=0o700, exist_ok=True)
                    made.update(os.path.join(self._dirs[state], *sub[:i]) for i in range(len(sub)))
        for path in sorted(made):  # a new directory is durable once its parent is synced
            self._ops.fsync_dir(path)

    def _run(self, func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self._reactor, self._threadpool, func, *args)

    @staticmethod
    def _now(func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``func`` here, on the caller's thread: for a step with no fsync (one rename or
        unlink, tens of microseconds), which costs less than a hop to the writing thread and back."""
        try:
            return defer.succeed(func(*args))
        except Exception:
            return defer.fail()

    def _dir_of(self, state: str, qid: str) -> str:
        if state in self.HASHED_STATES:
            return os.path.join(self._dirs[state], *hash_dirs(qid, self.hash_depth))
        return self._dirs[state]

    def _path_of(self, state: str, qid: str) -> str:
        return os.path.join(self._dir_of(state, qid), qid)

    def _find(self, qid: str) -> str | None:
        """The state whose directory holds ``qid`` now (index first, then the disk)."""
        if not isinstance(qid, str) or not _SAFE_QID.match(qid):
            return None
        state = self._index.get(qid)
        if state is not None and os.path.exists(self._path_of(state, qid)):
            return state
        for state in QUEUE_STATES:
            if os.path.exists(self._path_of(state, qid)):
                self._index[qid] = state
                return state
        self._index.pop(qid, None)
        return None

    def _path(self, qid: str) -> str:
        state = self._find(qid)
        if state is None:
            raise KeyError(qid)
        return self._path_of(state, qid)

    # -- IQueueStore

    def enqueue(self, envelope: Envelope, body: bytes, state: str = INCOMING) -> defer.Deferred[Any]:
        try:
            qid = check_qid(envelope.qid)
            check_enqueue_state(state)
            first = qfile.record(envelope.to_json())
        except ValueError:
            return defer.fail()
        return self._run(self._enqueue, qid, first, body, state, due_time(envelope))

    def enqueue_many(self, items: builtins.list[tuple[Envelope, bytes]], state: str = INCOMING) -> defer.Deferred[Any]:
        try:
            check_enqueue_state(state)
        except ValueError:
            return defer.fail()
        prepared: builtins.list[tuple[str, bytes, bytes, float] | Exception] = []
        for envelope, body in items:
            try:
                prepared.append((check_qid(envelope.qid), qfile.record(envelope.to_json()), body, due_time(envelope)))
            except ValueError as e:
                prepared.append(e)
        return self._run(self._enqueue_many, prepared, state)

    @_translated
    def _enqueue(self, qid: str, first: bytes, body: bytes, state: str = INCOMING, due: float = 0.0) -> str:
        path = self._place(qid, first, body, state, due)
        try:
            self.syncer.sync((self._dirs[state],))
        except OSError:
            # Renamed but maybe not on disk: take it back, so the refusal leaves nothing.
            discard(self._ops, path)
            raise
        return qid

    def _enqueue_many(self, prepared: builtins.list[tuple[str, bytes, bytes, float] | Exception], state: str) -> builtins.list[Any]:
        """Each message written and renamed in turn on this one thread, then one directory fsync for all."""
        results: builtins.list[Any] = []
        placed: builtins.list[tuple[int, str]] = []
        for item in prepared:
            if isinstance(item, Exception):
                results.append(item)
                continue
            try:
                qid, first, body, due = item
                placed.append((len(results), _translated(self._place)(qid, first, body, state, due)))
                results.append(item[0])
            except (QueueError, QueueFull) as e:
                results.append(e)
        if placed:
            try:
                _translated(self.syncer.sync)((self._dirs[state],))
            except (QueueError, QueueFull) as e:
                for i, path in placed:
                    discard(self._ops, path)
                    results[i] = e
        return results

    def _place(self, qid: str, first: bytes, body: bytes, state: str, due: float = 0.0) -> str:
        """Write the queue file in tmp/ (fsynced; its mtime the due time, when one is set), over a
        spare file when there is one, and rename it into ``state``: its path there."""
        ops = self._ops
        path = self._path_of(state, qid)
        # qids are unique across processes by construction: the index and incoming/ are enough
        if qid in self._index or os.path.exists(path):
            raise QueueError(f"queue id {qid} already queued")
        tmp = os.path.join(self._tmp, qid)
        reused = self._claim_spare(tmp)
        write_new_file(ops, tmp, [qfile.header(body), body, first], mtime=due, reuse=reused)
        try:
            ops.rename(tmp, path)  # the commit point
        except OSError:
            discard(ops, tmp)
            raise
        # No index entry: a listener worker only enqueues and would keep one per message for ever
        # (the main process removes the file); the first move or read finds it in its state directory.
        return path

    def _claim_spare(self, tmp: str) -> bool:
        """(writing thread) Rename a spare file to ``tmp``, if spare/ has one: True when it did.
        Other processes take spares too: a name found gone is skipped."""
        if not self.spares:
            return False
        for _ in range(SPARE_TRIES):
            try:
                name = self._spare_names.pop()  # atomic: the writing threads share the list
            except IndexError:
                if not self._look_for_spares():
                    return False
                continue
            try:
                self._ops.rename(os.path.join(self._spare_dir, name), tmp)
            except FileNotFoundError:
                continue
            except OSError:  # spare/ unusable (replaced, permissions): a new file, as without spares
                return False
            if os.stat(tmp).st_nlink == 1:
                return True
            discard(self._ops, tmp)  # a stale name of a queued file (see the class): that one stays
        return False

    def _look_for_spares(self) -> bool:
        """Fill the list of spare names from spare/ (after finding it empty, only every SPARE_RELOOK-th time)."""
        with self._spare_lock:
            if self._spare_names:
                return True
            if self._spare_misses:
                self._spare_misses = (self._spare_misses + 1) % SPARE_RELOOK
                return False
            try:
                names = [n for n in os.listdir(self._spare_dir) if _SAFE_QID.match(n)]
            except OSError:  # gone or unusable: look again later
                names = []
            random.shuffle(names)  # so that processes looking at once do not all try the same names
            self._spare_names.extend(names)
            self._spare_misses = 0 if names else 1
            return bool(names)

    def _open(self, qid: str, flags: int = _RDONLY, ops: FileOps | None = None) -> int:
        """Open the file of ``qid`` where the index says, else where the disk says (no stat first)."""
        opener = ops.open if ops else os.open
        state = self._index.get(qid)
        if state is not None:
            try:
                return opener(self._path_of(state, qid), flags)
            except FileNotFoundError:  # moved by another process: look again
                pass
        try:
            return opener(self._path(qid), flags)
        except FileNotFoundError:  # moved or removed meanwhile
            raise KeyError(qid) from None

    def load(self, qid: str) -> Envelope:
        """The envelope; an unreadable one is quarantined (as by :meth:`read_body`) and raises
        ValueError. Recovery reads deferred/ by name and time only, so this is where a file that
        rotted there while it waited is found."""
        fd = self._open(qid)
        try:
            return self._envelope_of(qid, qfile.read_meta(fd))
        except ValueError as e:
            self._quarantine_found(qid, str(e))
            raise
        finally:
            os.close(fd)

    def _quarantine_found(self, qid: str, reason: str) -> None:
        """Move a file found unreadable to corrupt/. On the reactor thread only the rename is done
        here: the two directory fsyncs go to the writing threads (a rotten queue must not stall
        the reactor; a move lost in a crash only makes the next read quarantine the file again)."""
        state = self._find(qid)
        if state not in (None, CORRUPT):
            self._quarantine(self._path_of(state, qid), qid, reason)
            self._index[qid] = CORRUPT
            dirs = (self._dir_of(state, qid), self._dirs[CORRUPT])
            if threadable.isInIOThread():
                try:
                    synced = self._run(self.syncer.sync, dirs)
                except Exception:  # the pool refused the job (stopped, late in a shutdown): here, then
                    self.syncer.sync(dirs)
                    return
                synced.addErrback(
                    lambda f: log.error("cannot sync the quarantine of {qid}: {why}", qid=qid, why=f.getErrorMessage()))
            else:
                self.syncer.sync(dirs)

    @staticmethod
    def _envelope_of(qid: str, meta: qfile.QueueFile) -> Envelope:
        if meta.records.last is None:
            raise qfile.QueueFileError("no sound envelope record")
        envelope = Envelope.from_json(meta.records.last)
        if envelope.qid != qid:
            raise OtherQueueId(f"queue file {qid} holds queue id {envelope.qid!r}")
        return envelope

    def load_message(self, qid: str) -> tuple[Envelope, bytes]:
        """The envelope and the body from one open and one read of the file; an unreadable
        envelope or a torn body is quarantined (as by :meth:`load` and :meth:`read_body`)."""
        if not isinstance(qid, str) or not _SAFE_QID.match(qid):
            raise KeyError(qid)
        fd = self._open(qid)
        try:
            meta, body = qfile.read_message(fd)
            return self._envelope_of(qid, meta), body
        except ValueError as e:
            self._quarantine_found(qid, str(e))
            raise
        finally:
            os.close(fd)

    def read_body(self, qid: str) -> bytes:
        """The body, checked against its recorded size and checksum; a torn one is quarantined
        (moved to corrupt/, logged) and raises ValueError."""
        if not isinstance(qid, str) or not _SAFE_QID.match(qid):
            raise KeyError(qid)
        fd = self._open(qid)
        try:
            return qfile.read_body(fd)
        except qfile.QueueFileError as e:
            self._quarantine_found(qid, str(e))
            raise
        finally:
            os.close(fd)

    def state(self, qid: str) -> str | None:
        return self._find(qid)

    def update(self, envelope: Envelope) -> defer.Deferred[Any]:
        try:
            rec = qfile.record(envelope.to_json())
        except ValueError:
            return defer.fail()
        return self._run(self._update, envelope.qid, rec, due_time(envelope))

    @_translated
    def _update(self, qid: str, rec: bytes, due: float = 0.0) -> None:
        """Append ``rec`` after the last sound record, set the file's mtime to ``due`` (when set)
        and fsync; a torn tail is cut off first."""
        ops = self._ops
        fd = self._open(qid, _RDWR, ops)
        try:
            meta = qfile.read_meta(fd)
            offset = meta.records_start + meta.records.end
            if meta.records.end + len(rec) > max(qfile.COMPACT_AFTER, 4 * len(rec)):
                self._compact(qid, fd, rec, due)
                return
            if meta.records.torn:
                ops.ftruncate(fd, offset)
            try:
                view = memoryview(rec)
                while view:
                    view = view[ops.pwrite(fd, view, offset + len(rec) - len(view)) :]
                os.utime(fd, (due, due) if due > 0 else None)  # no due time: due now
                ops.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # a half-written record is ignored anyway; leave no garbage
                    ops.ftruncate(fd, offset)
                raise
        except qfile.QueueFileError as e:
            raise QueueError(f"queue file {qid}: {e}") from e
        finally:
            ops.close(fd)

    def _compact(self, qid: str, fd: int, rec: bytes, due: float = 0.0) -> None:
        """Rewrite the file with ``rec`` as its only record (its appended records grew too long)."""
        body = qfile.read_body(fd)
        path = self._path(qid)
        tmp = os.path.join(self._tmp, f"{qid}.{next(self._seq)}")
        write_new_file(self._ops, tmp, [qfile.header(body), body, rec], mtime=due)
        try:
            self._ops.rename(tmp, path)
        except OSError:
            discard(self._ops, tmp)
            raise
        self.syncer.sync((os.path.dirname(path),))

    def move(self, qid: str, state: str) -> defer.Deferred[Any]:
        try:
            check_state(state)
        except ValueError:
            return defer.fail()
        if state == ACTIVE:  # a rename only (see _move)
            return self._now(self._move, qid, state)
        return self._run(self._move, qid, state)

    def _on_file(self, qid: str, action: Callable[[str], None]) -> str:
        """Run ``action(path)`` on the file of ``qid`` where the index says (no stat first), else
        where the disk says; return the state it was in. KeyError if it is nowhere."""
        state = self._index.get(qid)
        if state is not None:
            try:
                action(self._path_of(state, qid))
                return state
            except FileNotFoundError:  # moved by another process: look again
                pass
        state = self._find(qid)
        if state is None:
            raise KeyError(qid)
        action(self._path_of(state, qid))
        return state

    @_translated
    def _move(self, qid: str, state: str) -> None:
        target = self._path_of(state, qid)
        if self._index.get(qid) == state and os.path.exists(target):
            return
        current = self._on_file(qid, lambda source: self._ops.rename(source, target))
        self._index[qid] = state
        if state != ACTIVE:  # recovery puts active/ back into incoming/: a lost rename there changes nothing
            self.syncer.sync((self._dir_of(current, qid), os.path.dirname(target)))

    def remove(self, qid: str, durable: bool = True) -> defer.Deferred[Any]:
        # Without durability, a lone unlink: cheaper on the reactor thread than a hop to the
        # writing thread and back (measured: 519 against 375 relayed msgs/s at 2 KB) -- but only
        # for a small file: freeing a large one takes milliseconds (30 MB: 7 ms here). A small
        # finished file in active/ may become a spare instead (a rename).
        if durable or not self._small(qid):
            return self._run(self._remove, qid, durable)
        if self._index.get(qid) == ACTIVE and self._room_for_spare():
            return self._now(self._retire, qid)
        return self._now(self._remove, qid, durable)

    @_translated
    def _retire(self, qid: str) -> None:
        """Rename a finished message's file from active/ into spare/ (its removal, not durable)."""
        try:
            self._ops.rename(self._path_of(ACTIVE, qid), os.path.join(self._spare_dir, qid))
        except OSError:  # moved by another process after all, or spare/ unusable: removed as without spares
            self._remove(qid, False)
            return
        self._index.pop(qid, None)
        self._spare_kept = (self._spare_kept or 0) + 1

    def sweep_spares(self, before: float) -> defer.Deferred[Any]:
        """Unlink the spare files retired (or last written) before ``before`` (wall time): spares
        wait only while mail flows, so a delivered message's content does not linger once it stops.
        By the inode's change time, which the retiring rename sets: the modification time is a
        deferred message's due time, possibly hours ahead. Fires with the number unlinked."""
        d = self._run(self._sweep_spares, before)

        def swept(count: int) -> int:
            if count:
                self._spare_kept = None  # count again at the next removal
            return count

        return d.addCallback(swept)

    @_translated
    def _sweep_spares(self, before: float) -> int:
        try:
            names = [n for n in os.listdir(self._spare_dir) if _SAFE_QID.match(n)]
        except OSError:
            return 0
        count = 0
        for name in names:
            path = os.path.join(self._spare_dir, name)
            try:
                if os.stat(path).st_ctime < before:
                    self._ops.unlink(path)
                    count += 1
            except FileNotFoundError:  # taken by a new message meanwhile
                continue
        return count

    def _release_spares(self) -> None:
        """Unlink every spare (on a writing thread), once per shortage: spare/ then holds none."""
        if self._releasing or self._spare_kept == 0:
            return
        self._releasing = True

        def released(result: Any) -> Any:
            self._releasing = False
            if not isinstance(result, Failure):
                self._spare_kept = 0  # only this (delivering) store adds spares, and it adds none now
            return result

        d = self.sweep_spares(float("inf")).addBoth(released)
        d.addErrback(lambda f: log.error("cannot unlink the spare queue files: {why}", why=f.getErrorMessage()))

    def _room_for_spare(self) -> bool:
        """Whether spare/ holds fewer than ``spares`` files, as far as this store knows; it counts
        again when it believes it full, every SPARE_RELOOK-th time (other processes take spares)."""
        if not self.spares:
            return False
        if self.space_low is not None and self.space_low():
            self._release_spares()
            return False
        if self._spare_kept is not None and self._spare_kept < self.spares:
            return True
        self._spare_full_tries = (self._spare_full_tries + 1) % SPARE_RELOOK
        if self._spare_kept is not None and self._spare_full_tries != 1:
            return False
        try:
            self._spare_kept = len(os.listdir(self._spare_dir))
        except OSError:
            return False
        return self._spare_kept < self.spares

    def _small(self, qid: str) -> bool:
        """Whether the file of ``qid`` is known and at most INLINE_UNLINK_MAX octets (one stat)."""
        state = self._index.get(qid)
        if state is None:
            return False
        try:
            return os.stat(self._path_of(state, qid)).st_size <= INLINE_UNLINK_MAX
        except OSError:
            return False

    @_translated
    def _remove(self, qid: str, durable: bool = True) -> None:
        try:
            state = self._on_file(qid, self._ops.unlink)
        except KeyError:
            return
        finally:
            self._index.pop(qid, None)
        if durable:
            self.syncer.sync((self._dir_of(state, qid),))

    def list(self, state: str) -> list[str]:
        directory = self._dirs[check_state(state)]
        if state not in self.HASHED_STATES:
            return sorted(n for n in os.listdir(directory) if _SAFE_QID.match(n))
        out: list[str] = []
        for sub in itertools.product(_HEX, repeat=self.hash_depth):
            try:
                out.extend(n for n in os.listdir(os.path.join(directory, *sub)) if _SAFE_QID.match(n))
            except FileNotFoundError:
                continue
        out.sort()
        return out

    def recover(self) -> dict[str, int]:
        """Make the directory consistent after a stop or crash; see IQueueStore.recover.

        Also migrates a queue written before the one-file format (:meth:`migrate`), checks every
        file's header, recorded body size (and, in files up to 128 KiB, the body's checksum) and envelope
        records, quarantines what fails, and counts torn envelope records (the state before
        them counts: their recipients are retried). All at once, on the calling thread: the MTA
        uses :meth:`recover_incrementally`.
        """
        counts = self._recover_begin()
        for state, directory in self._recover_units():
            self._recover_unit(state, directory, counts)
        return self._recover_end(counts)

    def recover_incrementally(self, on_batch: Callable[[builtins.list[Recovered]], Any]) -> defer.Deferred[Any]:
        """:meth:`recover` in steps: what must happen before anything else touches the queue
        (migration, tmp/ cleared, active/ put back into incoming/) now, on the calling thread;
        then one directory at a time in the thread pool, each batch of sound messages handed to
        ``on_batch`` on the reactor thread as soon as it is read. Fires with the counts (and logs
        them) after the last batch. New mail may be queued meanwhile: a message it reads that has
        moved on since is skipped, one announced both ways is the caller's to de-duplicate."""
        try:
            counts = self._recover_begin()
        except Exception:
            return defer.fail()
        return self._recover_steps(counts, on_batch)

    @defer.inlineCallbacks
    def _recover_steps(
        self, counts: dict[str, int], on_batch: Callable[[builtins.list[Recovered]], Any]
    ) -> Generator[defer.Deferred[Any], Any, dict[str, int]]:
        for state, directory in self._recover_units():
            batch = yield self._run(self._recover_unit, state, directory, counts, state == DEFERRED)
            if batch:
                on_batch(batch)
        return self._recover_end(counts)  # corrupt/ holds few files: counted and logged here

    @_translated
    def _recover_begin(self) -> dict[str, int]:
        ops = self._ops
        counts = new_counts()
        self._make_dirs()
        self.migrate(counts)
        touched: set[str] = set()  # directories whose entries changed: synced before anything new is queued
        for name in os.listdir(self._tmp):
            discard(ops, os.path.join(self._tmp, name))
            counts["tmp_removed"] += 1
            touched.add(self._tmp)
        for qid in self.list(ACTIVE):
            ops.rename(self._path_of(ACTIVE, qid), self._path_of(INCOMING, qid))
            counts["requeued"] += 1
            touched.update((self._dirs[ACTIVE], self._dirs[INCOMING]))
        if touched:
            self.syncer.sync(touched)
        return counts

    def _recover_units(self) -> builtins.list[tuple[str, str]]:
        """(state, directory) in the order recovery reads them: incoming/ first (due now), then
        every hashed deferred/ directory, then hold/."""
        units: builtins.list[tuple[str, str]] = []
        for state in (INCOMING, DEFERRED, HOLD):
            if state in self.HASHED_STATES:
                units.extend((state, os.path.join(self._dirs[state], *sub))
                             for sub in itertools.product(_HEX, repeat=self.hash_depth))  # fmt: skip
            else:
                units.append((state, self._dirs[state]))
        return units

    @_translated
    def _recover_unit(self, state: str, directory: str, counts: dict[str, int], by_time: bool = False) -> builtins.list[Recovered]:
        """Check the files of one directory (quarantining what fails); the sound ones as
        ``(qid, state, due, arrival)``: ``due`` is the wall time of the next attempt
        (``max(next_attempt, not_before)``), ``arrival`` the envelope's.

        ``by_time``: take ``due`` from the file's mtime and ``arrival`` from the queue id, with
        no read of the file (a stat per message: a large deferred mass is read in seconds, not
        minutes); each file is then checked when its attempt loads it."""
        out: list[Recovered] = []
        touched: set[str] = set()
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return out
        for name in names:
            if state in self.HASHED_STATES and not _SAFE_QID.match(name):
                continue  # not ours: list() does not see it either
            path = os.path.join(directory, name)
            arrival = qid_time(name) if by_time else None
            if arrival is not None:
                try:
                    due = os.stat(path).st_mtime
                except FileNotFoundError:
                    continue  # moved on since the directory was listed
                self._index.setdefault(name, state)
                counts["queued"] += 1
                out.append((name, state, due, arrival))
                continue
            reason, torn, envelope = self._check_file(path, name)
            if reason == _GONE:
                continue  # moved on (delivered, deferred again) since the directory was listed
            if reason == _STALE:
                log.warn("{qid}: a second name of another message's file (a spare reused across a crash): unlinked",
                         qid=name, event="stale_name")  # fmt: skip
                discard(self._ops, path)
                touched.add(directory)
                continue
            if torn and reason is None:
                counts["torn_records"] += 1
                log.warn("torn envelope record in {qid}: the state before it counts", qid=name, event="torn_record")
            if reason is not None:
                counts["torn_body" if reason.startswith("torn body") else "corrupt"] += 1
                try:
                    self._quarantine(path, name, reason)
                except FileNotFoundError:
                    continue
                touched.update((directory, self._dirs[CORRUPT]))
                continue
            assert envelope is not None
            self._index.setdefault(name, state)
            counts["queued"] += 1
            out.append((name, state, max(envelope.next_attempt, envelope.not_before), envelope.arrival))
        if touched:
            self.syncer.sync(touched)
        return out

    def _recover_end(self, counts: dict[str, int]) -> dict[str, int]:
        counts["quarantined"] = counts["corrupt"] + counts["torn_body"] + counts["missing_body"]
        counts["in_corrupt"] = len(self.list(CORRUPT))
        log.info(
            "queue recovered: queued {queued}, quarantined {quarantined} ({corrupt} unreadable, "
            "{torn_body} torn bodies, {missing_body} without body; {in_corrupt} in corrupt/), "
            "{requeued} requeued, {torn_records} torn envelope records, {migrated} migrated from the "
            "old layout, {orphan_bodies} orphan bodies, {tmp_removed} temporary files removed",
            event="queue_recovered",
            **counts,
        )
        return counts

    def _check_file(self, path: str, name: str) -> tuple[str | None, bool, Envelope | None]:
        """(why the file ``name`` cannot be queued or None, whether its last record is torn, its
        envelope); the reason is ``_GONE`` when the file is not there any more."""
        if not _SAFE_QID.match(name):
            return "not a queue id", False, None
        try:
            fd = os.open(path, _RDONLY)
        except FileNotFoundError:
            return _GONE, False, None
        except OSError as e:
            return f"unreadable: {e}", False, None
        try:
            meta = qfile.read_meta(fd, verify_body=True)
            envelope = self._envelope_of(name, meta)
        except OtherQueueId as e:
            return (_STALE if os.fstat(fd).st_nlink > 1 else str(e)), False, None
        except (OSError, ValueError) as e:
            return str(e), False, None
        finally:
            os.close(fd)
        return None, meta.records.torn, envelope

    def _quarantine(self, path: str, name: str, reason: str) -> None:
        target = os.path.join(self._dirs[CORRUPT], name)
        for n in itertools.count(1):
            if not os.path.exists(target):
                break
            target = os.path.join(self._dirs[CORRUPT], f"{name}.{n}")
        log.error("quarantining {qid} in corrupt/: {reason}", qid=name, reason=reason, event="quarantine")
        self._ops.rename(path, target)
        self.quarantined += 1

    # -- the layout before one file per message

    def migrate(self, counts: dict[str, int] | None = None) -> dict[str, int]:
        """Convert a queue of the previous layout (JSON envelope files in the state directories,
        bodies in ``data/``) to one queue file per message, crash-safely and idempotently.

        Each message is written whole in tmp/ and renamed into its state (over its old envelope
        file); only after the directories are synced are the old files unlinked, so a crash at
        any point leaves either form complete. ``data/`` goes last: while it exists, a start
        migrates. Unreadable old envelopes go to corrupt/ with their body beside them (``.body``).
        """
        counts = new_counts() if counts is None else counts
        data = self._legacy_data
        if not os.path.isdir(data):
            return counts
        ops = self._ops
        leftovers: list[str] = []  # old envelope files whose new file is elsewhere (hashed states), then bodies
        synced: set[str] = set()
        for state in QUEUE_STATES:
            directory = self._dirs[state]
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if not os.path.isfile(path) or qfile.is_queue_file(_head(path)):
                    continue
                if state == CORRUPT:
                    self._keep_legacy_body(name.partition(".")[0])
                    continue
                try:
                    raw = _read(path)
                    envelope = Envelope.from_json(raw)
                    if envelope.qid != name:
                        raise ValueError(f"envelope holds queue id {envelope.qid!r}")
                    body = _read(os.path.join(data, name))
                except FileNotFoundError:
                    counts["missing_body"] += 1
                    self._quarantine(path, name, "missing body")
                    continue
                except (OSError, ValueError) as e:
                    counts["corrupt"] += 1
                    self._quarantine(path, name, f"unreadable envelope: {e}")
                    self._keep_legacy_body(name)
                    continue
                tmp = os.path.join(self._tmp, f"{name}.migrate")
                discard(ops, tmp)
                write_new_file(ops, tmp, [qfile.header(body), body, qfile.record(raw)])
                target = self._path_of(state, name)
                ops.rename(tmp, target)
                synced.add(os.path.dirname(target))
                if target != path:
                    leftovers.append(path)
                leftovers.append(os.path.join(data, name))
                counts["migrated"] += 1
        for path in sorted(synced):
            ops.fsync_dir(path)
        for path in leftovers:
            discard(ops, path)
        for name in os.listdir(data):
            discard(ops, os.path.join(data, name))
            counts["orphan_bodies"] += 1
        for path in self._dirs.values():
            ops.fsync_dir(path)
        ops.fsync_dir(data)
        os.rmdir(data)
        ops.fsync_dir(self.root)
        log.info("migrated {migrated} messages to one queue file each", event="queue_migrated", **counts)
        return counts

    def _keep_legacy_body(self, qid: str) -> None:
        """Move the old-layout body of a quarantined message beside it in corrupt/ (for the operator)."""
        source = os.path.join(self._legacy_data, qid)
        target = os.path.join(self._dirs[CORRUPT], f"{qid}.body")
        if _SAFE_QID.match(qid) and os.path.exists(source) and not os.path.exists(target):
            self._ops.rename(source, target)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(qfile.MAGIC))
