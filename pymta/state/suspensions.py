"""Operator suspensions: hold mail for a domain, provider, source, campaign or tenant until a time.

Kept behind :class:`pymta.interfaces.ISuspensions`; this is the local backend, one SQLite table
under state_dir (so a suspension survives a restart), mirrored in memory so the delivery path
asks no database. A suspension lapses by itself at ``until``; lapsed rows are swept on writes.

With a cluster (:class:`pymta.interfaces.IClusterState`) every suspension is also a record of the
shared ``suspensions`` table: added or lifted on one node, it is added or lifted on every node as
soon as the change is published to it (or at its next heartbeat); one made while the shared state
was away is published when it returns.
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.interfaces import ISuspensions

log = Logger(namespace="pymta.state.suspensions")

SUSPENDED_TEXT = "Suspended by the operator"  # how the relay's reply to suspended mail begins
FIELDS = ("id", "kind", "value", "reason", "created", "until")
KINDS = ("domain", "provider", "source", "campaign", "tenant")
MAX_SUSPENSIONS = 10_000
MAX_DURATION = 30 * 86400.0
_DURATION = re.compile(r"^\s*(\d{1,7}(?:\.\d{1,3})?)\s*([smhd]?)\s*$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: Any) -> float:
    """``"2h"``, ``"90m"``, ``"1d"``, ``"30s"`` or a number of seconds; ValueError says why."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError("duration must be like 30s, 90m, 2h or 1d")
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError("duration must be like 30s, 90m, 2h or 1d")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"duration must be more than 0 and at most {int(MAX_DURATION // 86400)}d")
    return seconds


@implementer(ISuspensions)
class SQLiteSuspensions:
    """Suspensions in ``path`` (SQLite), on the wall clock ``clock``."""

    def __init__(self, path: str, clock: Any, cluster: Any = None) -> None:
        self.path = path
        self.clock = clock
        self.cluster = cluster
        self._unpublished: set[str] = set()  # ids made here that the cluster's table does not have yet
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS suspensions (id TEXT PRIMARY KEY, kind TEXT NOT NULL,"
                        " value TEXT NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL, until REAL NOT NULL)")  # fmt: skip
        self._rows: dict[str, dict[str, Any]] = {}
        for row in self.db.execute("SELECT id, kind, value, reason, created, until FROM suspensions"):
            self._rows[row[0]] = dict(zip(FIELDS, row, strict=True))
        if cluster is not None:
            cluster.watch("suspensions", self.apply_shared)

    def close(self) -> None:
        self.db.close()

    def _sweep(self) -> None:
        now = self.clock.seconds()
        gone = [i for i, r in self._rows.items() if r["until"] <= now]
        for i in gone:
            del self._rows[i]
        if gone:
            self.db.execute("DELETE FROM suspensions WHERE until <= ?", (now,))

    def add(self, kind: str, value: str, duration: float, reason: str) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        value = value.strip().lower().rstrip(".") if kind == "domain" else value.strip()
        if not value or len(value) > 253:
            raise ValueError(f"{kind} must be a non-empty name of at most 253 characters")
        self._sweep()
        if len(self._rows) >= MAX_SUSPENSIONS:
            raise ValueError(f"too many suspensions in force (at most {MAX_SUSPENSIONS})")
        now = self.clock.seconds()
        row = {"id": uuid.uuid4().hex[:16], "kind": kind, "value": value, "reason": reason[:1000],
               "created": now, "until": now + duration}  # fmt: skip
        self._insert(row)
        log.warn("suspending {kind} {value} until {until} ({id}): {reason}", event="suspend", **row)
        self._publish(row)
        return dict(row)

    def _insert(self, row: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO suspensions VALUES (:id, :kind, :value, :reason, :created, :until)",
                            row)  # fmt: skip
        self._rows[row["id"]] = row

    def _publish(self, row: dict[str, Any]) -> None:
        if self.cluster is not None:
            self._unpublished.add(row["id"])
            d = self.cluster.put_record("suspensions", row["id"], row, row["until"])
            d.addCallback(lambda stored: self._unpublished.discard(row["id"]) if stored else None)

    def remove(self, suspension_id: str) -> dict[str, Any] | None:
        row = self._forget(suspension_id)
        if row is not None:
            log.info("suspension {id} of {kind} {value} lifted", event="suspend_lifted", **row)
            if self.cluster is not None:
                self._unpublished.discard(suspension_id)
                self.cluster.delete_record("suspensions", suspension_id)
        return row

    def _forget(self, suspension_id: str) -> dict[str, Any] | None:
        row = self._rows.pop(suspension_id, None)
        if row is not None:
            self.db.execute("DELETE FROM suspensions WHERE id = ?", (suspension_id,))
        return row

    def apply_shared(self, records: dict[str, dict[str, Any]]) -> None:
        """The cluster's suspensions in force: new ones are taken here, ones lifted elsewhere are
        lifted here, and ones made here while the shared state was away are published."""
        now = self.clock.seconds()
        for sid, r in records.items():
            self._unpublished.discard(sid)
            if sid in self._rows:
                continue
            try:
                row = {k: r[k] for k in FIELDS}
                if row["kind"] not in KINDS or row["id"] != sid or float(row["until"]) <= now:
                    continue
                row["until"], row["created"] = float(row["until"]), float(row["created"])
            except (KeyError, TypeError, ValueError):
                continue
            self._insert(row)
            log.warn("suspending {kind} {value} until {until} ({id}), as another node did: {reason}",
                     event="suspend", **row)  # fmt: skip
        for sid in [i for i in self._rows if i not in records]:
            if sid in self._unpublished:
                if self._rows[sid]["until"] > now:
                    self._publish(self._rows[sid])
                continue
            gone = self._forget(sid)
            if gone is not None and gone["until"] > now:
                log.info("suspension {id} of {kind} {value} lifted on another node", event="suspend_lifted", **gone)

    def in_force(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        return sorted((dict(r) for r in self._rows.values() if r["until"] > now), key=lambda r: (r["until"], r["id"]))

    def match(self, **names: str | None) -> dict[str, Any] | None:
        """The suspension in force that lasts longest among those matching any of ``names``
        (domain=, provider=, source=, campaign=, tenant=); None when nothing holds the mail."""
        if not self._rows:
            return None
        now = self.clock.seconds()
        wanted = {(k, (v.lower().rstrip(".") if k == "domain" else v)) for k, v in names.items() if v}
        hits = [r for r in self._rows.values() if r["until"] > now and (r["kind"], r["value"]) in wanted]
        return dict(max(hits, key=lambda r: r["until"])) if hits else None
