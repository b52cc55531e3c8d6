"""Queue operations an operator asks for (list, show, flush, delete, hold, release), over one store.

The same functions serve the running MTA (through its control socket, with the queue manager
doing the moves so its schedule stays right) and ``pymta-queue`` on a stopped MTA (directly on
the queue directory).
"""

from __future__ import annotations

import heapq
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger

from pymta.admin.accounting import pending_received
from pymta.envelope import Envelope
from pymta.interfaces import ACTIVE, DEFERRED, HOLD, INCOMING, QUEUE_STATES, IQueueStore
from pymta.state.suspensions import SUSPENDED_TEXT

BOUNCE_KINDS = ("domain", "campaign", "tenant")
log = Logger(namespace="pymta.admin.queue_ops")


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


def list_queue(store: IQueueStore, limit: int | None = None) -> list[dict[str, Any]]:
    """Queued messages, oldest first, with their recipients and state: every one, or with ``limit``
    the first ``limit`` (only their files are read, whatever the size of the queue)."""
    names = [(qid, state) for state in QUEUE_STATES for qid in store_calls(store).list(state)]
    names = heapq.nsmallest(limit, names) if limit is not None else sorted(names)
    out = []
    for qid, state in names:
        try:
            out.append(message_summary(store_calls(store).load(qid), state))
        except (KeyError, ValueError):
            out.append({"qid": qid, "state": state, "size": 0, "arrival": 0, "sender": "?", "recipients": []})
    return out


def show_message(store: IQueueStore, qid: str) -> dict[str, Any]:
    state = _state_or_error(store, qid)
    summary = message_summary(store_calls(store).load(qid), state)
    body: bytes = store_calls(store).read_body(qid)
    summary["headers"] = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return summary


def store_calls(store: IQueueStore) -> Any:
    """``store`` for calling its methods: zope.interface methods are written without ``self``, so
    mypy (no zope plugin) cannot check a call through the interface."""
    return store


def _state_or_error(store: IQueueStore, qid: str) -> str:
    state: str | None = store_calls(store).state(qid)
    if state is None:
        raise QueueOpError(f"no message {qid} in the queue")
    return state


class QueueOperations:
    """Applies operator requests; with a queue manager, through it (it owns the schedule)."""

    def __init__(self, store: IQueueStore, manager: Any = None, shaper: Any = None, selector: Any = None,
                 suspensions: Any = None, webhooks: Any = None, accounting: Any = None) -> None:  # fmt: skip
        self.store = store
        self.accounting = accounting  # without a manager: where a delete writes the received records left to pickup
        self.suspensions = suspensions
        self.webhooks = webhooks  # anything with status(): the webhook senders (pymta.events.webhooks)
        self.manager = manager
        self.shaper = shaper
        self.selector = selector

    def qids(self, target: str) -> list[str]:
        if target == "all":
            return [m["qid"] for m in list_queue(self.store)]
        _state_or_error(self.store, target)
        return [target]

    @defer.inlineCallbacks
    def run(self, command: str, target: str | None = None, domain: str | None = None,
            args: dict[str, Any] | None = None) -> Any:  # fmt: skip
        if command == "list":
            limit = (args or {}).get("limit")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise QueueOpError("list: limit must be a whole number of at least 1")
            return list_queue(self.store, limit)
        if command == "show":
            return show_message(self.store, self._need(target))
        if command == "shaping":
            return self.shaping(target or domain)
        if command == "webhooks":
            if self.webhooks is None:
                raise QueueOpError("no [[webhooks]] are configured")
            return {"webhooks": self.webhooks.status()}
        if command == "suspend":
            return self.suspend(args or {})
        if command == "suspensions":
            return {"suspensions": self._need_suspensions().in_force()}
        if command == "unsuspend":
            return self.unsuspend(target)
        if command == "bounce":
            bounced = yield self.bounce(args or {})
            return bounced
        if command == "flush":
            return self.flush(None if target == "all" else target, domain)
        if command in ("delete", "hold", "release"):
            done: list[str] = []
            after_attempt: list[str] = []
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

    def _need_suspensions(self) -> Any:
        if self.suspensions is None:
            raise QueueOpError("suspensions need the running MTA (no control socket answered)")
        return self.suspensions

    def suspend(self, args: dict[str, Any]) -> dict[str, Any]:
        """Hold the mail of one domain, provider, source, campaign or tenant for ``duration``
        (KumoMTA's admin suspend): it waits in the queue without using attempts, then goes."""
        from pymta.state.suspensions import KINDS, parse_duration

        store = self._need_suspensions()
        named = [k for k in KINDS if args.get(k) is not None]
        if len(named) != 1:
            raise QueueOpError(f"suspend takes exactly one of {', '.join(KINDS)}")
        kind = named[0]
        value, reason = args[kind], args.get("reason", "suspended by the operator")
        if not isinstance(value, str):
            raise QueueOpError(f"{kind} must be a string")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
            raise QueueOpError("reason must be a non-empty string of at most 1000 characters")
        try:
            return cast(dict[str, Any], store.add(kind, value, parse_duration(args.get("duration", "1h")), reason.strip()))
        except ValueError as e:
            raise QueueOpError(str(e)) from None

    def unsuspend(self, suspension_id: str | None) -> dict[str, Any]:
        row = self._need_suspensions().remove(suspension_id or "")
        if row is None:
            raise QueueOpError(f"no suspension {suspension_id} in force")
        flushed = []
        if self.manager is not None:  # what it held is due now
            flushed = self.manager.flush(self._held_by_suspension())
        return {"lifted": row, "flushed": len(flushed)}

    @defer.inlineCallbacks
    def bounce(self, args: dict[str, Any]) -> Any:
        """KumoMTA's admin bounce: every queued message (incoming, deferred, held) for one recipient
        ``domain``, ``campaign`` or ``tenant`` fails with a DSN (5.0.0 "administratively bounced:
        REASON"); one being delivered fails when its attempt ends."""
        if self.manager is None:
            raise QueueOpError("bounce needs the running MTA (no control socket answered)")
        named = [k for k in BOUNCE_KINDS if args.get(k) is not None]
        if len(named) != 1:
            raise QueueOpError(f"bounce takes exactly one of {', '.join(BOUNCE_KINDS)}")
        kind = named[0]
        value, reason = args[kind], args.get("reason")
        if not isinstance(value, str) or not value.strip() or len(value) > 253:
            raise QueueOpError(f"{kind} must be a non-empty string of at most 253 characters")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
            raise QueueOpError("reason must be a non-empty string of at most 1000 characters")
        reason = " ".join(reason.split())  # one line: it goes into a reply text and a DSN
        if kind == "domain":
            value = value.strip().lower().rstrip(".")
            matches = (lambda envelope, r: r.domain.lower() == value)  # noqa: E731
        else:
            matches = (lambda envelope, r: envelope.extra.get(kind) == value)  # noqa: E731
        qids = self._deferred_where(matches, (INCOMING, DEFERRED, HOLD, ACTIVE))
        messages = recipients = 0
        after_attempt = []
        for qid in qids:
            n = yield self.manager.bounce(qid, matches, reason)
            if n is None:
                after_attempt.append(qid)
            elif n:
                messages, recipients = messages + 1, recipients + n
        log.info("administrative bounce of {kind} {value}: {messages} message(s), {recipients} recipient(s) ({reason})",
                 kind=kind, value=value, messages=messages, recipients=recipients, reason=reason,
                 after_attempt=len(after_attempt), event="admin_bounce")  # fmt: skip
        return {"kind": kind, "value": value, "reason": reason, "messages": messages, "recipients": recipients,
                "after_attempt": after_attempt}  # fmt: skip

    def _held_by_suspension(self) -> list[str]:
        return self._deferred_where(lambda envelope, r: str((r.reply or {}).get("text", "")).startswith(SUSPENDED_TEXT))

    def _deferred_for(self, domain: str) -> list[str]:
        """Deferred messages with a recipient still pending at ``domain``."""
        return self._deferred_where(lambda envelope, r: r.domain.lower() == domain)

    def _deferred_where(self, pending_matches: Any, states: tuple[str, ...] = (DEFERRED,)) -> list[str]:
        """Messages in ``states`` with a pending recipient for which ``pending_matches(envelope, rcpt)``."""
        out = []
        for state in states:
            for qid in store_calls(self.store).list(state):
                try:
                    envelope = store_calls(self.store).load(qid)
                except (KeyError, ValueError):
                    continue
                if any(pending_matches(envelope, r) for r in envelope.pending_recipients()):
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
        suspensions = self.suspensions.in_force() if self.suspensions is not None else []
        return {"destinations": destinations, "sources": sources, "suspensions": suspensions}

    @staticmethod
    def _need(target: str | None) -> str:
        if not target:
            raise QueueOpError("this command needs a queue id")
        return target

    @defer.inlineCallbacks
    def _delete_directly(self, qid: str) -> Any:
        """A delete on a stopped MTA's queue. A message never picked up by a queue manager may still
        owe its received records (pending_received): they go on disk first, or nothing is deleted."""
        store = store_calls(self.store)
        if store.state(qid) in (INCOMING, HOLD):
            try:
                records = pending_received(self.accounting, store.load(qid))
            except (KeyError, ValueError):  # gone meanwhile, or unreadable (quarantined by the load)
                records = []
            written = yield defer.DeferredList(records, consumeErrors=True)
            if not all(ok and result is not False for ok, result in written):
                raise QueueOpError(f"{qid} not deleted: its received records could not be written")
        yield store.remove(qid)

    def _apply(self, command: str, qid: str) -> defer.Deferred[Any]:
        if self.manager is not None:
            return defer.maybeDeferred(getattr(self.manager, command), qid)
        store = store_calls(self.store)
        if command == "delete":
            return self._delete_directly(qid)
        if command == "hold":
            return defer.maybeDeferred(store.move, qid, HOLD)
        if store.state(qid) != HOLD:
            return defer.succeed(None)
        return defer.maybeDeferred(store.move, qid, INCOMING)
