"""The admin API: queue shape and messages, per-message operations, suppressions, shaping, health.

Every queue operation goes through :class:`pymta.admin.queue_ops.QueueOperations`, the same code
path ``pymta-queue`` uses over the control socket.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, threads

from pymta.admin.http.jsonapi import JSONAPI, APIError, json_body, query, query_int
from pymta.admin.queue_ops import QueueOperations, QueueOpError, message_summary, show_message, store_calls
from pymta.envelope import is_qid
from pymta.interfaces import QUEUE_STATES

# Postfix qshape's age buckets (minutes), the last one open-ended.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def age_bucket(age_seconds: float) -> str:
    minutes = max(0.0, age_seconds) / 60
    for limit in AGE_BUCKETS:
        if minutes < limit:
            return f"<{limit}m"
    return f">={AGE_BUCKETS[-1]}m"


def queue_shape(store: Any, now: float) -> dict[str, Any]:
    """Counts by state, and per state by recipient domain and age bucket (qshape's view)."""
    states: dict[str, int] = {}
    domains: dict[str, dict[str, Any]] = {}
    for state in QUEUE_STATES:
        qids = store.list(state)
        states[state] = len(qids)
        for qid in qids:
            try:
                envelope = store.load(qid)
            except (KeyError, ValueError, OSError):
                continue
            bucket = age_bucket(now - envelope.arrival)
            for rcpt in envelope.pending_recipients():
                entry = domains.setdefault(rcpt.domain, {"total": 0, "by_state": {}, "by_age": {}})
                entry["total"] += 1
                entry["by_state"][state] = entry["by_state"].get(state, 0) + 1
                entry["by_age"][bucket] = entry["by_age"].get(bucket, 0) + 1
    top = sorted(domains.items(), key=lambda kv: (-kv[1]["total"], kv[0]))
    return {
        "messages": states,
        "total": sum(states.values()),
        "age_buckets": [f"<{b}m" for b in AGE_BUCKETS] + [f">={AGE_BUCKETS[-1]}m"],
        "domains": [{"domain": d, **v} for d, v in top[:500]],
    }


def message_page(
    store: Any, state: str | None, domain: str | None, limit: int, cursor: str | None
) -> dict[str, Any]:
    """Messages in queue-id order after ``cursor``; ``next_cursor`` continues. Scans a bounded
    number of entries per call, so a filter that matches little still answers quickly."""
    states = [state] if state else list(QUEUE_STATES)
    entries = sorted((qid, s) for s in states for qid in store.list(s) if cursor is None or qid > cursor)
    out: list[dict[str, Any]] = []
    scanned = 0
    last = None
    for qid, s in entries:
        if len(out) >= limit or scanned >= max(1000, limit * 20):
            break
        scanned += 1
        last = qid
        try:
            envelope = store.load(qid)
        except (KeyError, ValueError, OSError):
            continue
        if domain and not any(r.domain == domain for r in envelope.recipients):
            continue
        out.append(message_summary(envelope, s))
    more = last is not None and entries and last != entries[-1][0]
    return {"messages": out, "next_cursor": last if more else None}


class AdminAPI:
    """Registers the admin routes on a :class:`JSONAPI`."""

    def __init__(
        self,
        operations: QueueOperations,
        clock: Any,
        threadpool: Any,
        reactor: Any,
        suppression: Any = None,
        health: Any = None,
    ) -> None:
        self.ops = operations
        self.store = operations.store
        self.clock = clock
        self.threadpool = threadpool
        self.reactor = reactor
        self.suppression = suppression
        self.health = health

    def register(self, api: JSONAPI) -> None:
        api.route("GET", "/healthz", self.healthz, None)
        api.route("GET", "/api/v1/queue", self.queue, "read")
        api.route("GET", "/api/v1/queue/messages", self.messages, "read")
        api.route("GET", "/api/v1/messages/{qid}", self.message, "read")
        api.route("DELETE", "/api/v1/messages/{qid}", self.delete, "admin")
        api.route("POST", "/api/v1/messages/{qid}/{action}", self.action, "admin")
        api.route("GET", "/api/v1/shaping", self.shaping, "read")
        api.route("GET", "/api/v1/webhooks", self.webhooks, "read")
        api.route("GET", "/api/v1/suspend", self.suspensions, "read")
        api.route("POST", "/api/v1/suspend", self.suspend, "admin")
        api.route("DELETE", "/api/v1/suspend/{suspension_id}", self.unsuspend, "admin")
        api.route("POST", "/api/v1/bounce", self.bounce, "admin")
        api.route("GET", "/api/v1/suppressions", self.suppressions, "read")
        api.route("POST", "/api/v1/suppressions", self.suppress, "admin")
        api.route("DELETE", "/api/v1/suppressions/{address}", self.unsuppress, "admin")

    def _in_thread(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.threadpool, f, *args)

    # -- health ---------------------------------------------------------------------------

    def healthz(self, request: Any) -> Any:
        report = self.health() if self.health is not None else {"ok": True}
        return (200 if report.get("ok") else 503), report

    # -- queue ----------------------------------------------------------------------------

    def queue(self, request: Any) -> defer.Deferred[Any]:
        return self._in_thread(queue_shape, self.store, self.clock.seconds())

    def messages(self, request: Any) -> defer.Deferred[Any]:
        state = query(request, "state")
        if state is not None and state not in QUEUE_STATES:
            raise APIError(400, f"state must be one of {', '.join(QUEUE_STATES)}", "state")
        domain = (query(request, "domain") or "").lower().rstrip(".") or None
        limit = query_int(request, "limit", 100, 1, 1000)
        cursor = query(request, "cursor")
        if cursor is not None and not is_qid(cursor):
            raise APIError(400, "cursor is not a queue id", "cursor")
        return self._in_thread(message_page, self.store, state, domain, limit, cursor)

    def _qid(self, qid: str) -> str:
        if not is_qid(qid):
            raise APIError(400, "not a queue id", "qid")
        if store_calls(self.store).state(qid) is None:
            raise APIError(404, f"no message {qid} in the queue")
        return qid

    def message(self, request: Any, qid: str) -> Any:
        return self._in_thread(show_message, self.store, self._qid(qid))

    @defer.inlineCallbacks
    def _run(self, command: str, qid: str | None) -> Any:
        try:
            result = yield self.ops.run(command, qid)
        except QueueOpError as e:
            raise APIError(409, str(e)) from None
        return result

    def delete(self, request: Any, qid: str) -> defer.Deferred[Any]:
        return self._run("delete", self._qid(qid))

    def action(self, request: Any, qid: str, action: str) -> defer.Deferred[Any]:
        if action not in ("flush", "hold", "release"):
            raise APIError(404, "no such action (flush, hold, release)")
        return self._run(action, self._qid(qid))

    def shaping(self, request: Any) -> defer.Deferred[Any]:
        return self._run("shaping", query(request, "domain"))  # ?domain=D: the destinations D goes through

    def webhooks(self, request: Any) -> defer.Deferred[Any]:
        return self._run("webhooks", None)

    # -- suspensions and admin bounces (one code path with pymta-queue) -------------------

    @defer.inlineCallbacks
    def _run_args(self, command: str, target: str | None, args: dict[str, Any] | None, field: str | None = None) -> Any:
        try:
            result = yield self.ops.run(command, target, None, args)
        except QueueOpError as e:
            raise APIError(400 if args is not None else 404, str(e), field) from None
        return result

    def suspensions(self, request: Any) -> defer.Deferred[Any]:
        return self._run_args("suspensions", None, None)

    def suspend(self, request: Any) -> defer.Deferred[Any]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object")
        d = self._run_args("suspend", None, body)
        return d.addCallback(lambda row: (201, row))

    def unsuspend(self, request: Any, suspension_id: str) -> defer.Deferred[Any]:
        return self._run_args("unsuspend", suspension_id, None)

    def bounce(self, request: Any) -> defer.Deferred[Any]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object")
        return self._run_args("bounce", None, body)

    # -- suppressions ---------------------------------------------------------------------

    def _need_suppression(self) -> Any:
        if self.suppression is None:
            raise APIError(503, "no suppression list is configured")
        return self.suppression

    def suppressions(self, request: Any) -> dict[str, Any]:
        store = self._need_suppression()
        limit = query_int(request, "limit", 100, 1, 1000)
        cursor = query(request, "cursor") or ""
        rows = store.page(cursor, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = f"{rows[-1]['address']}\t{rows[-1]['scope']}" if more and rows else None
        return {"suppressions": rows, "next_cursor": next_cursor}

    def suppress(self, request: Any) -> Any:
        store = self._need_suppression()
        body = json_body(request)
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object")
        address = body.get("address")
        if not isinstance(address, str) or "@" not in address or len(address) > 320:
            raise APIError(400, "address must be an email address", "address")
        scope = body.get("scope")
        if scope is not None and (not isinstance(scope, str) or len(scope) > 253):
            raise APIError(400, "scope must be a domain", "scope")
        reason = body.get("reason", "added through the API")
        if not isinstance(reason, str) or len(reason) > 1000:
            raise APIError(400, "reason must be a string", "reason")
        try:
            entry = store.add(address, reason, "manual", scope)
        except ValueError as e:
            raise APIError(400, str(e), "address") from None
        return 201, entry

    def unsuppress(self, request: Any, address: str) -> Any:
        store = self._need_suppression()
        from urllib.parse import unquote

        address = unquote(address)
        scope = query(request, "scope")
        if not store.remove(address, scope):
            raise APIError(404, f"{address} is not suppressed" + (f" for {scope}" if scope else ""))
        return {"removed": address, "scope": scope or ""}


def disk_health(queue_dir: str, min_free: int, listeners: Any = None) -> dict[str, Any]:
    """``ok`` only when the queue directory is writable and has ``min_free`` octets free."""
    problems = []
    try:
        st = os.statvfs(queue_dir)
        free = st.f_bavail * st.f_frsize
    except OSError as e:
        free = 0
        problems.append(f"queue directory: {e.strerror}")
    if not os.access(queue_dir, os.W_OK):
        problems.append("queue directory not writable")
    if free < min_free:
        problems.append(f"free space {free} below min_free {min_free}")
    report: dict[str, Any] = {"ok": not problems, "queue_dir_free": free}
    if listeners is not None:
        report["listeners"] = listeners()
    if problems:
        report["problems"] = problems
    return report
