"""Where events come from: delivery outcomes (through the accounting records the queue manager
already writes), feedback outcomes, one-click unsubscribes, opens and clicks."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from pymta.events.journal import EventJournal

DELIVERY_EVENTS = frozenset({"delivered", "deferred", "bounced", "expired", "relayed"})
_COPIED = ("qid", "recipient", "sender", "campaign", "tenant", "metadata", "pool", "source", "provider", "mx",
           "attempt", "reply")  # fmt: skip


def bounce_class(reply: dict[str, Any] | None) -> dict[str, str] | None:
    """{"reason", "class": "hard" | "soft"} for a failure reply (pymta's classification rules)."""
    from pymta.feedback.classify import classify

    if not reply or str(reply.get("code") or "").startswith("2"):
        return None
    code = reply.get("code")
    reason, hard = classify(reply.get("enhanced") or None, str(reply.get("text") or ""),
                            code if isinstance(code, int) else None)  # fmt: skip
    return {"reason": reason, "class": "hard" if hard else "soft"}


class AccountingEvents:
    """Stands in for the accounting log: records pass to it (when there is one) and delivery
    outcomes become events."""

    def __init__(self, journal: EventJournal, accounting: Any = None) -> None:
        self.journal = journal
        self.accounting = accounting

    def record(self, event: str, **fields: Any) -> defer.Deferred[Any]:
        """Fires once the accounting record and the event are on disk (what the queue manager
        waits for before it writes the recipients' new state)."""
        waits = [defer.maybeDeferred(self.accounting.record, event, **fields)] if self.accounting is not None else []
        if event in DELIVERY_EVENTS:
            self._emit(event, fields)
            waits.append(self.journal.synced())
        return defer.gatherResults(waits, consumeErrors=True) if waits else defer.succeed(None)

    def _emit(self, event: str, fields: dict[str, Any]) -> None:
        out = {k: fields.get(k) for k in _COPIED}
        reply = fields.get("reply") or None
        if reply:
            out["enhanced"] = reply.get("enhanced") or None
        if event in ("bounced", "expired", "deferred"):
            out["bounce"] = bounce_class(reply)
        self.journal.emit(event, **out)

    def __getattr__(self, name: str) -> Any:
        # reopen, close ... are the accounting log's own
        if self.accounting is None:
            raise AttributeError(name)
        return getattr(self.accounting, name)
