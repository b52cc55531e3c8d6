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
    def run(self, command: str, target: str | None = None, domain: str | None = None):
        if command == "list":
            return list_queue(self.store)
        if command == "show":
            return show_message(self.store, self._need(target))
        if command == "shaping":
            return self.shaping(target or domain)
        if command == "flush":
            return self.flush(None if target == "all" else target, domain)
        if command in ("delete", "hold", "release"):
            done, after_attempt = [], []
            for qid in self.qids(self._need(target)):
                if command == "hold" and self.manager is not None and self.manager.in_flight(qid):
                    after_attempt.append(qid)
                yield self._apply(command, qid)
                done.append(qid)
            result: dict[str, Any] = {command: done}
            if after_attempt:
                result["after_attempt"] = after_attempt  # being delivered now: held when the attempt ends
            return result
        raise QueueOpError(f"unknown command {command!r}")

    def flush(self, qid: str | None = None, domain: str | None = None) -> dict[str, Any]:
        """``postqueue -f``: deferred mail is due now and every destination's pause or dead-site
        suspension is lifted; with ``qid``, that message only; with ``domain``, the deferred mail
        for that domain and the destinations it goes through."""
        if self.manager is None:
            raise QueueOpError("flush needs the running MTA (no control socket answered)")
        if qid is not None and domain is not None:
            raise QueueOpError("flush takes a queue id or a domain, not both")
        if qid is not None:
            state = _state_or_error(self.store, qid)
            if state == HOLD:
                raise QueueOpError(f"{qid} is on hold: release it to deliver it")
            due = self.manager.flush([qid])
            return {"flushed": len(due), "qid": qid, "state": "active" if self.manager.in_flight(qid) else state}
        resumed: list[str] = []
        if domain is not None:
            domain = domain.lower().rstrip(".")
            if self.shaper is not None:
                resumed = self.shaper.resume(self.shaper.keys_for(domain))
            return {"flushed": len(self.manager.flush(self._deferred_for(domain))), "domain": domain, "resumed": resumed}
        if self.shaper is not None:
            resumed = self.shaper.resume()
        return {"flushed": len(self.manager.flush()), "resumed": resumed}

    def _deferred_for(self, domain: str) -> list[str]:
        """Deferred messages with a recipient still pending at ``domain``."""
        out = []
        for qid in self.store.list(DEFERRED):
            try:
                envelope = self.store.load(qid)
            except (KeyError, ValueError):
                continue
            if any(r.domain.lower() == domain for r in envelope.pending_recipients()):
                out.append(qid)
        return out

    def shaping(self, domain: str | None = None) -> dict[str, Any]:
        """Why each destination (or those mail for ``domain`` goes through) is paused or slowed, and
        the state of every source (the running MTA)."""
        if self.shaper is None and self.selector is None:
            raise QueueOpError("shaping state needs the running MTA (no control socket answered)")
        keys = (sorted(self.shaper.states) if domain is None else self.shaper.keys_for(domain)) if self.shaper else []
        destinations = [self.shaper.explain(key) for key in keys]
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
