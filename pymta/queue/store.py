"""Queue stores: the durable maildir-style spool and the in-memory fake, both behind IQueueStore.

Layout of the maildir store under ``root`` (state_dir/queue)::

    tmp/                 files being written (deleted by recover)
    data/<qid>           bodies: written once, never moved after commit
    incoming/<qid> ...   one directory per queue state holding the JSON envelope files

Callers serialise the operations on one qid (wait for one Deferred before the next change of
the same message); different qids may be worked on concurrently. Another process may share
the directory (a listener-only process and a delivery process): lookups fall back to the
disk when the in-memory index is stale. ``recover()`` must run only while no other process
writes to the queue (it deletes what looks unfinished).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pymta.envelope import Envelope
from pymta.interfaces import ACTIVE, CORRUPT, HOLD, INCOMING, QUEUE_STATES, IQueueStore, QueueError, QueueFull
from pymta.queue.fsio import DirSyncer, FileOps, NoSyncFileOps, discard, is_space_error, write_new_file

log = Logger()

# A qid becomes a file name: only these names are accepted (new_qid() produces a subset).
_SAFE_QID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")

RECOVER_COUNTS = ("tmp_removed", "requeued", "corrupt", "missing_body", "orphan_bodies", "queued")


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

    def _write(self, qid: str, action) -> defer.Deferred:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        try:
            return defer.succeed(action())
        except Exception:
            return defer.fail()

    def enqueue(self, envelope: Envelope, body: bytes, state: str = INCOMING) -> defer.Deferred:
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

    def load(self, qid: str) -> Envelope:
        return Envelope.from_json(self._envelopes[qid])

    def read_body(self, qid: str) -> bytes:
        return self._bodies[qid]

    def state(self, qid: str) -> str | None:
        return self._states.get(qid)

    def update(self, envelope: Envelope) -> defer.Deferred:
        def action() -> None:
            if envelope.qid not in self._states:
                raise KeyError(envelope.qid)
            self._envelopes[envelope.qid] = envelope.to_json()

        return self._write(envelope.qid, action)

    def move(self, qid: str, state: str) -> defer.Deferred:
        def action() -> None:
            check_state(state)
            if qid not in self._states:
                raise KeyError(qid)
            self._states[qid] = state

        return self._write(qid, action)

    def remove(self, qid: str) -> defer.Deferred:
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
        counts["queued"] = len(self._states)
        return counts


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


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@implementer(IQueueStore)
class MaildirQueueStore:
    """The durable spool: envelope and body files, renamed into state directories, fsynced off the reactor.

    Commits share directory fsyncs (:class:`pymta.queue.fsio.DirSyncer`): with N concurrent
    enqueues, each does its own file fsyncs in a pool thread and the directory fsyncs are done
    about twice per batch instead of N times. ``fsync=False`` drops every fsync (not durable).
    ``ops`` replaces the file-system primitives (tests record and break them).
    """

    def __init__(
        self,
        root: str,
        reactor: Any,
        threadpool: Any,
        fsync: bool = True,
        ops: FileOps | None = None,
    ) -> None:
        self.root = root
        self._reactor = reactor
        self._threadpool = threadpool
        self._ops = ops or (FileOps() if fsync else NoSyncFileOps())
        self.syncer = DirSyncer(self._ops)  # public for measurements (fsyncs, waiting)
        self._tmp = os.path.join(root, "tmp")
        self._data = os.path.join(root, "data")
        self._dirs = {state: os.path.join(root, state) for state in QUEUE_STATES}
        self._index: dict[str, str] = {}  # qid -> state; the disk wins when they disagree
        self._seq = itertools.count(1)
        self._make_dirs()
        self._rebuild_index()

    # -- helpers

    def _make_dirs(self) -> None:
        for path in (self.root, self._tmp, self._data, *self._dirs.values()):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def _rebuild_index(self) -> None:
        self._index = {}
        for state in QUEUE_STATES:
            for qid in self.list(state):
                self._index[qid] = state

    def _run(self, func: Callable[..., Any], *args: Any) -> defer.Deferred:
        return deferToThreadPool(self._reactor, self._threadpool, func, *args)

    def _find(self, qid: str) -> str | None:
        """The state whose directory holds ``qid`` now (index first, then the disk)."""
        if not isinstance(qid, str) or not _SAFE_QID.match(qid):
            return None
        state = self._index.get(qid)
        if state is not None and os.path.exists(os.path.join(self._dirs[state], qid)):
            return state
        for state in QUEUE_STATES:
            if os.path.exists(os.path.join(self._dirs[state], qid)):
                self._index[qid] = state
                return state
        self._index.pop(qid, None)
        return None

    def _path(self, qid: str) -> str:
        state = self._find(qid)
        if state is None:
            raise KeyError(qid)
        return os.path.join(self._dirs[state], qid)

    # -- IQueueStore

    def enqueue(self, envelope: Envelope, body: bytes, state: str = INCOMING) -> defer.Deferred:
        try:
            qid = check_qid(envelope.qid)
            check_enqueue_state(state)
        except ValueError:
            return defer.fail()
        return self._run(self._enqueue, qid, envelope.to_json(), body, state)

    @_translated
    def _enqueue(self, qid: str, env_bytes: bytes, body: bytes, state: str = INCOMING) -> str:
        ops = self._ops
        body_path = os.path.join(self._data, qid)
        env_path = os.path.join(self._dirs[state], qid)
        if qid in self._index or os.path.exists(body_path):
            raise QueueError(f"queue id {qid} already queued")
        tmp_body = os.path.join(self._tmp, qid + ".body")
        tmp_env = os.path.join(self._tmp, qid + ".env")
        write_new_file(ops, tmp_body, body)
        try:
            write_new_file(ops, tmp_env, env_bytes)
            ops.rename(tmp_body, body_path)
        except OSError:
            discard(ops, tmp_body)
            discard(ops, tmp_env)
            raise
        try:
            ops.rename(tmp_env, env_path)  # the commit point
        except OSError:
            discard(ops, tmp_env)
            discard(ops, body_path)
            raise
        self._index[qid] = state
        try:
            self.syncer.sync((self._data, self._dirs[state]))
        except OSError:
            # Renamed but maybe not on disk: take it back, so the refusal leaves nothing. If the
            # envelope is already gone (another process took it), the body is theirs now.
            self._index.pop(qid, None)
            try:
                ops.unlink(env_path)
            except OSError:
                pass
            else:
                discard(ops, body_path)
            raise
        return qid

    def load(self, qid: str) -> Envelope:
        try:
            raw = _read(self._path(qid))
        except FileNotFoundError:  # moved or removed meanwhile
            raise KeyError(qid) from None
        envelope = Envelope.from_json(raw)
        if envelope.qid != qid:
            raise ValueError(f"envelope file {qid} holds queue id {envelope.qid!r}")
        return envelope

    def read_body(self, qid: str) -> bytes:
        if not isinstance(qid, str) or not _SAFE_QID.match(qid):
            raise KeyError(qid)
        try:
            return _read(os.path.join(self._data, qid))
        except FileNotFoundError:
            raise KeyError(qid) from None

    def state(self, qid: str) -> str | None:
        return self._find(qid)

    def update(self, envelope: Envelope) -> defer.Deferred:
        return self._run(self._update, envelope.qid, envelope.to_json())

    @_translated
    def _update(self, qid: str, env_bytes: bytes) -> None:
        ops = self._ops
        path = self._path(qid)
        tmp = os.path.join(self._tmp, f"{qid}.env.{next(self._seq)}")
        write_new_file(ops, tmp, env_bytes)
        try:
            ops.rename(tmp, path)
        except OSError:
            discard(ops, tmp)
            raise
        self.syncer.sync((os.path.dirname(path),))

    def move(self, qid: str, state: str) -> defer.Deferred:
        try:
            check_state(state)
        except ValueError:
            return defer.fail()
        return self._run(self._move, qid, state)

    @_translated
    def _move(self, qid: str, state: str) -> None:
        source = self._path(qid)
        current = self._index[qid]
        if current == state:
            return
        self._ops.rename(source, os.path.join(self._dirs[state], qid))
        self._index[qid] = state
        self.syncer.sync((self._dirs[current], self._dirs[state]))

    def remove(self, qid: str) -> defer.Deferred:
        return self._run(self._remove, qid)

    @_translated
    def _remove(self, qid: str) -> None:
        state = self._find(qid)
        if state is None:
            return
        dirs = [self._dirs[state], self._data]
        try:  # envelope first: a crash in between leaves an orphan body, which recover() drops
            self._ops.unlink(os.path.join(dirs[0], qid))
        except FileNotFoundError:
            pass
        self._index.pop(qid, None)
        try:
            self._ops.unlink(os.path.join(self._data, qid))
        except FileNotFoundError:
            pass
        self.syncer.sync(dirs)

    def list(self, state: str) -> list[str]:
        names = os.listdir(self._dirs[check_state(state)])
        return sorted(n for n in names if _SAFE_QID.match(n))

    def recover(self) -> dict[str, int]:
        """Make the directory consistent after a stop or crash; see IQueueStore.recover."""
        ops = self._ops
        counts = new_counts()
        self._make_dirs()
        for name in os.listdir(self._tmp):
            discard(ops, os.path.join(self._tmp, name))
            counts["tmp_removed"] += 1
        for qid in self.list(ACTIVE):
            ops.rename(os.path.join(self._dirs[ACTIVE], qid), os.path.join(self._dirs[INCOMING], qid))
            counts["requeued"] += 1
        referenced = set()
        for state in QUEUE_STATES:
            directory = self._dirs[state]
            for name in sorted(os.listdir(directory)):
                if state == CORRUPT:
                    referenced.add(name.partition(".")[0])
                    continue
                reason = self._check_envelope(directory, name)
                if reason is None:
                    referenced.add(name)
                    continue
                counts["missing_body" if reason == "missing body" else "corrupt"] += 1
                self._quarantine(directory, name, reason)
                referenced.add(name)
        for name in os.listdir(self._data):
            if name not in referenced:
                log.warn("dropping body {qid} that has no envelope", qid=name)
                discard(ops, os.path.join(self._data, name))
                counts["orphan_bodies"] += 1
        ops.fsync_dir(self._tmp)
        self.syncer.sync([self._data, *self._dirs.values()])
        self._rebuild_index()
        counts["queued"] = len(self._index)
        log.info(
            "queue recovered: {queued} queued, {requeued} requeued, {corrupt} corrupt, "
            "{missing_body} without body, {orphan_bodies} orphan bodies, {tmp_removed} temporary files removed",
            **counts,
        )
        return counts

    def _check_envelope(self, directory: str, name: str) -> str | None:
        """Why the envelope file ``name`` cannot be queued, or None when it is sound."""
        if not _SAFE_QID.match(name):
            return "not a queue id"
        try:
            envelope = Envelope.from_json(_read(os.path.join(directory, name)))
        except (OSError, ValueError) as e:
            return f"unreadable envelope: {e}"
        if envelope.qid != name:
            return f"envelope holds queue id {envelope.qid!r}"
        if not os.path.exists(os.path.join(self._data, name)):
            return "missing body"
        return None

    def _quarantine(self, directory: str, name: str, reason: str) -> None:
        target = os.path.join(self._dirs[CORRUPT], name)
        for n in itertools.count(1):
            if not os.path.exists(target):
                break
            target = os.path.join(self._dirs[CORRUPT], f"{name}.{n}")
        log.error("quarantining {qid} in corrupt/: {reason}", qid=name, reason=reason)
        self._ops.rename(os.path.join(directory, name), target)
