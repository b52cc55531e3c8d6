"""Queue stores: the durable maildir-style spool and the in-memory fake, both behind IQueueStore.

Layout of the maildir store under ``root`` (state_dir/queue)::

    tmp/                 files being written (deleted by recover)
    data/<qid>           bodies: written once, never moved after commit
    incoming/<qid> ...   one directory per queue state holding the JSON envelope files

Callers serialise the operations on one qid (wait for one Deferred before the next change of
the same message); different qids may be worked on concurrently.
"""

from __future__ import annotations

import re

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.envelope import Envelope
from pymta.interfaces import ACTIVE, INCOMING, QUEUE_STATES, IQueueStore, QueueError

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

    def enqueue(self, envelope: Envelope, body: bytes) -> defer.Deferred:
        qid = envelope.qid

        def action() -> str:
            check_qid(qid)
            if qid in self._states:
                raise QueueError(f"queue id {qid} already queued")
            self._envelopes[qid] = envelope.to_json()
            self._bodies[qid] = bytes(body)
            self._states[qid] = INCOMING
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
