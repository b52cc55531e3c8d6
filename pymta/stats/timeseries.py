"""Per-minute counts of mail flow by provider, source and campaign, and queue depth, in SQLite.

Received mail is counted by ``received(envelope)``, called once per queue id from the queue
manager's notification (as the metrics count it), so mail accepted by listener workers counts
too. One ``twisted.logger`` observer (like the metrics) reads the rooms' other structured events:
the queue manager's delivered/deferred/bounced/expired events, the feedback processor's
complaints and unsubscribes, and ``open``/``click`` events of any room.
Counts are summed in memory and written in batches off the reactor thread; gauges (queue depth
by state, suppression list size, webhook backlog) are sampled once a minute. Rows older than the
retention are deleted.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from pymta.feedback.classify import classify

log = Logger(namespace="pymta.stats")

METRICS = (
    "received", "delivered", "deferred", "bounced_hard", "bounced_soft", "expired",
    "complaints", "unsubscribes", "opens_human", "opens_machine", "clicks",
)  # fmt: skip
MAX_LABEL = 64
MAX_PENDING_KEYS = 20_000  # a batch this large is written at once
MAX_ROWS = 100_000  # bound on rows any one query returns

Key = tuple[int, str, str, str, str]  # minute, metric, provider, source, campaign


def _label(value: Any) -> str:
    return str(value)[:MAX_LABEL] if value else ""


def provider_label(destination: str | None, domain: str) -> str:
    """The provider a shaping destination names ("provider:gmail" -> "gmail"), else the domain."""
    if destination and destination.startswith("provider:"):
        return destination[len("provider:") :]
    return domain


class TimeSeries:
    """``observe`` counts events; ``flush`` writes them; ``query_*`` read (call them in a thread).

    ``run_in_thread(f, *args)`` returns a Deferred of ``f(*args)`` run off the reactor thread
    (``deferToThreadPool`` in the MTA; tests may run it inline). ``provider_of(domain, mx)``
    names the provider of a recipient (from the shaping configuration).
    """

    def __init__(
        self,
        path: str,
        clock: Any,
        run_in_thread: Callable[..., defer.Deferred[Any]],
        retention: float = 30 * 86400.0,
        provider_of: Callable[[str, str | None], str] | None = None,
        flush_interval: float = 5.0,
    ) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.retention = retention
        self.provider_of = provider_of or (lambda domain, mx: domain)
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS counts (minute INTEGER, metric TEXT, provider TEXT, source TEXT,"
            " campaign TEXT, n INTEGER, PRIMARY KEY (minute, metric, provider, source, campaign))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS reasons (minute INTEGER, provider TEXT, source TEXT, reason TEXT, n INTEGER,"
            " PRIMARY KEY (minute, provider, source, reason))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS gauges (minute INTEGER, name TEXT, value REAL, PRIMARY KEY (minute, name))"
        )
        self._pending: dict[Key, int] = {}
        self._reasons: dict[tuple[int, str, str, str], int] = {}
        self._gauges: dict[tuple[int, str], float] = {}
        self._writing: defer.Deferred[Any] | None = None
        self._last_prune = 0.0
        self.gauge_readers: list[Callable[[], dict[str, float]]] = []
        self._loops: list[task.LoopingCall] = []

    # -- feeding --------------------------------------------------------------------------

    def minute(self) -> int:
        return int(self.clock.seconds() // 60) * 60

    def count(
        self, metric: str, provider: str = "", source: str = "", campaign: str = "", n: int = 1
    ) -> None:
        key = (self.minute(), metric, _label(provider), _label(source), _label(campaign))
        self._pending[key] = self._pending.get(key, 0) + n
        if len(self._pending) >= MAX_PENDING_KEYS:
            self.flush()

    def received(self, envelope: Any) -> None:
        """One message accepted into the queue: its recipients count as received, by campaign."""
        extra = getattr(envelope, "extra", None) or {}
        self.count("received", campaign=extra.get("campaign") or "", n=len(envelope.recipients) or 1)

    def observe(self, event: dict[str, Any]) -> None:
        """A ``twisted.logger`` observer; never raises."""
        with contextlib.suppress(Exception):
            self._observe(event)

    def _observe(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        namespace = event.get("log_namespace", "")
        campaign = event.get("campaign") or ""
        if namespace == "pymta.queue" and kind in ("delivered", "deferred", "bounced", "expired"):
            rcpt = str(event.get("rcpt") or "")
            provider = self.provider_of(rcpt.rpartition("@")[2].lower(), event.get("mx"))
            source = event.get("source") or ""
            if kind == "bounced":
                reason, hard = classify(
                    event.get("enhanced"), str(event.get("text") or ""), event.get("code")
                )
                self.count("bounced_hard" if hard else "bounced_soft", provider, source, campaign)
                key = (self.minute(), _label(provider), _label(source), _label(reason))
                self._reasons[key] = self._reasons.get(key, 0) + 1
                if len(self._reasons) >= MAX_PENDING_KEYS:
                    self.flush()
            else:
                self.count(kind, provider, source, campaign)
        elif namespace == "pymta.feedback" and (kind == "feedback" or event.get("kind") == "unsubscribe"):
            outcome = str(event.get("outcome") or "")
            if outcome.startswith("unsubscribed") or event.get("kind") == "unsubscribe":
                self.count("unsubscribes", campaign=campaign)
            elif event.get("kind") == "arf":
                self.count("complaints", campaign=campaign)
        elif kind in ("open", "click", "complaint", "unsubscribe") and namespace.startswith("pymta."):
            provider = _label(event.get("provider"))
            source = _label(event.get("source"))
            if kind == "open":
                self.count(
                    "opens_machine" if event.get("machine") else "opens_human", provider, source, campaign
                )
            else:
                self.count({"click": "clicks", "complaint": "complaints", "unsubscribe": "unsubscribes"}[kind],
                           provider, source, campaign)  # fmt: skip

    def sample(self) -> None:
        """Reads the gauges (queue depth by state, ...) into this minute's row."""
        minute = self.minute()
        for read in self.gauge_readers:
            try:
                values = read()
            except Exception as e:
                log.warn("stats gauge could not be read: {why}", why=str(e), event="stats_gauge_failed")
                continue
            for name, value in values.items():
                self._gauges[(minute, _label(name))] = float(value)

    # -- writing --------------------------------------------------------------------------

    def flush(self) -> defer.Deferred[Any]:
        """Hands the batch to the writer thread; one write at a time, the next batch waits."""
        if self._writing is not None:
            return self._writing
        if not (self._pending or self._reasons or self._gauges):
            return defer.succeed(None)
        batch = (self._pending, self._reasons, self._gauges)
        self._pending, self._reasons, self._gauges = {}, {}, {}
        prune_before = None
        now = self.clock.seconds()
        if now - self._last_prune >= 3600:
            self._last_prune = now
            prune_before = int(now - self.retention)
        d = self.run_in_thread(self._write, batch, prune_before)

        def done(result: Any) -> Any:
            self._writing = None
            return result

        def failed(failure: Any) -> None:
            log.error("cannot write the stats database {path}: {why}", path=self.path,
                      why=str(failure.value), event="stats_write_failed")  # fmt: skip

        d.addErrback(failed).addBoth(done)
        if not d.called:
            self._writing = d
        return d

    def _write(self, batch: tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]], prune_before: int | None) -> None:
        counts, reasons, gauges = batch
        with self._lock:
            db = self.db
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT INTO counts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (minute, metric, provider, source, campaign)"
                    " DO UPDATE SET n = n + excluded.n",
                    [(*k, n) for k, n in counts.items()],
                )
                db.executemany(
                    "INSERT INTO reasons VALUES (?, ?, ?, ?, ?) ON CONFLICT (minute, provider, source, reason)"
                    " DO UPDATE SET n = n + excluded.n",
                    [(*k, n) for k, n in reasons.items()],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO gauges VALUES (?, ?, ?)", [(*k, v) for k, v in gauges.items()]
                )
                if prune_before is not None:
                    for table in ("counts", "reasons", "gauges"):
                        db.execute(f"DELETE FROM {table} WHERE minute < ?", (prune_before,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def start(self) -> None:
        for call, interval in ((self.flush, self.flush_interval), (self.sample, 60.0)):
            loop = task.LoopingCall(call)
            loop.clock = self.clock
            loop.start(interval, now=call == self.sample).addErrback(lambda f: log.failure("stats loop", f))
            self._loops.append(loop)

    def stop(self) -> defer.Deferred[Any]:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        d = self._writing or defer.succeed(None)
        return d.addCallback(lambda _: self.flush())

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- reading (in a thread) ------------------------------------------------------------

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql + f" LIMIT {MAX_ROWS}", args).fetchall()

    def per_minute(
        self, since: int, until: int, metrics: tuple[str, ...], provider: str | None = None
    ) -> dict[str, dict[int, int]]:
        """{metric: {minute: n}} between ``since`` and ``until`` (epoch seconds)."""
        marks = ",".join("?" * len(metrics))
        sql = f"SELECT metric, minute, SUM(n) FROM counts WHERE minute >= ? AND minute < ? AND metric IN ({marks})"
        args: tuple[Any, ...] = (since, until, *metrics)
        if provider is not None:
            sql += " AND provider = ?"
            args += (provider,)
        out: dict[str, dict[int, int]] = {m: {} for m in metrics}
        for metric, minute, n in self._rows(sql + " GROUP BY metric, minute", args):
            out[metric][minute] = n
        return out

    def totals(self, since: int, until: int, by: str | None = None) -> dict[str, dict[str, int]]:
        """{group: {metric: n}}; ``by`` is provider, source or campaign (None: one group "")."""
        column = by if by in ("provider", "source", "campaign") else "''"
        rows = self._rows(
            f"SELECT {column}, metric, SUM(n) FROM counts WHERE minute >= ? AND minute < ? GROUP BY 1, 2",
            (since, until),
        )
        out: dict[str, dict[str, int]] = {}
        for group, metric, n in rows:
            out.setdefault(group, {})[metric] = n
        return out

    def top_reasons(self, since: int, until: int, limit: int = 10) -> list[tuple[str, int]]:
        rows = self._rows(
            "SELECT reason, SUM(n) AS total FROM reasons WHERE minute >= ? AND minute < ? GROUP BY reason"
            " ORDER BY total DESC, reason", (since, until),
        )  # fmt: skip
        return [(r, n) for r, n in rows[:limit]]

    def gauge_series(self, since: int, until: int) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, minute, value in self._rows(
            "SELECT name, minute, value FROM gauges WHERE minute >= ? AND minute < ? ORDER BY minute",
            (since, until),
        ):
            out.setdefault(name, {})[minute] = value
        return out
