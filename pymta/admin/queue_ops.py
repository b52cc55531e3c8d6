"""Queue operations an operator asks for (list, show, flush, delete, hold, release), over one store.

The same functions serve the running MTA (through its control socket, with the queue manager
doing the moves so its schedule stays right) and ``pymta-queue`` on a stopped MTA (directly on
the queue directory).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from pymta.envelope import Envelope
from pymta.interfaces import DEFERRED, HOLD, INCOMING, QUEUE_STATES, IQueueStore


class QueueOpError(Exception):
    """An operator request that cannot be done (unknown id, bad command); the text says why."""


def message_summary(envelope: Envelope, state: str) -> dict[str, Any]:
    return {
        "qid": envelope.qid,
        "state": state,
        "size": envelope.size,
        "arrival": envelope.arrival,
        "sender": envelope.sender,
        "attempts": envelope.attempts,
        "next_attempt": envelope.next_attempt,
        "recipients": [
            {
                "address": r.address,
                "route": r.route,
                "state": r.state,
                "attempts": r.attempts,
                "reply": r.reply,
                "remote_mta": r.remote_mta,
            }
            for r in envelope.recipients
        ],
    }


def list_queue(store: IQueueStore) -> list[dict[str, Any]]:
    """Every queued message, oldest first, with its recipients and state."""
    out = []
    for state in QUEUE_STATES:
        for qid in store.list(state):
            try:
                out.append(message_summary(store.load(qid), state))
            except (KeyError, ValueError):
                out.append({"qid": qid, "state": state, "size": 0, "arrival": 0, "sender": "?", "recipients": []})
    out.sort(key=lambda m: m["qid"])
    return out


def show_message(store: IQueueStore, qid: str) -> dict[str, Any]:
    state = _state_or_error(store, qid)
    summary = message_summary(store.load(qid), state)
    body = store.read_body(qid)
    summary["headers"] = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return summary


def _state_or_error(store: IQueueStore, qid: str) -> str:
    state = store.state(qid)
    if state is None:
        raise QueueOpError(f"no message {qid} in the queue")
    return state


class QueueOperations:
    """Applies operator requests; with a queue manager, through it (it owns the schedule)."""

    def __init__(self, store: IQueueStore, manager: Any = None, shaper: Any = None, selector: Any = None) -> None:
        self.store = store
        self.manager = manager
        self.shaper = shaper
        self.selector = selector

    def qids(self, target: str) -> list[str]:
        if target == "all":
            return [m["qid"] for m in list_queue(self.store)]
        _state_or_error(self.store, target)
        return [target]

    @defer.inlineCallbacks
    def run(self, command: str, target: str | None = None):
        if command == "list":
            return list_queue(self.store)
        if command == "show":
            return show_message(self.store, self._need(target))
        if command == "shaping":
            return self.shaping()
        if command == "flush":
            if self.manager is None:
                raise QueueOpError("flush needs the running MTA (no control socket answered)")
            yield defer.maybeDeferred(self.manager.flush)
            return {"flushed": len(self.store.list(DEFERRED))}
        if command in ("delete", "hold", "release"):
            done = []
            for qid in self.qids(self._need(target)):
                yield self._apply(command, qid)
                done.append(qid)
            return {command: done}
        raise QueueOpError(f"unknown command {command!r}")

    def shaping(self) -> dict[str, Any]:
        """Why each destination is paused or slowed, and the state of every source (the running MTA)."""
        if self.shaper is None and self.selector is None:
            raise QueueOpError("shaping state needs the running MTA (no control socket answered)")
        destinations = [self.shaper.explain(key) for key in sorted(self.shaper.states)] if self.shaper else []
        sources = []
        if self.selector is not None:
            today = self.selector.today()
            seen = set()
            for pool in self.selector.pools.values():
                for source, _weight in pool.members:
                    if source.name in seen:
                        continue
                    seen.add(source.name)
                    counter = self.selector.counter
                    offset = self.selector.offset(source, today)
                    sources.append({
                        "source": source.name, "address": source.address, "usable": source.usable,
                        "why_unusable": source.why_unusable, "cap_today": source.cap(today, offset),
                        "sent_today": counter.count(source.name, today) if counter else None, "ladder_offset": offset,
                    })  # fmt: skip
        return {"destinations": destinations, "sources": sources}

    @staticmethod
    def _need(target: str | None) -> str:
        if not target:
            raise QueueOpError("this command needs a queue id")
        return target

    def _apply(self, command: str, qid: str) -> defer.Deferred:
        if self.manager is not None:
            return defer.maybeDeferred(getattr(self.manager, command), qid)
        if command == "delete":
            return defer.maybeDeferred(self.store.remove, qid)
        if command == "hold":
            return defer.maybeDeferred(self.store.move, qid, HOLD)
        if self.store.state(qid) != HOLD:
            return defer.succeed(None)
        return defer.maybeDeferred(self.store.move, qid, INCOMING)
