"""The suppression store (SQLite in state_dir): addresses that must not be mailed, and why.

Each entry: normalised address, scope (``""`` global, or a sender domain), reason, source
(bounce, complaint, unsubscribe, manual), first and last seen, count, expiry (0 = never).
Policy: a hard bounce suppresses; a complaint suppresses; ``soft_threshold`` soft bounces within
``soft_window`` suppress for ``soft_duration``. A lookup checks the global scope and the sender
domain's scope.
"""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from zope.interface import implementer

from pymta.interfaces import ISuppressionList

SOURCES = ("bounce", "complaint", "unsubscribe", "manual")
CSV_FIELDS = ("address", "scope", "reason", "source", "first_seen", "last_seen", "count", "expires")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT NOT NULL, scope TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL, source TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, count INTEGER NOT NULL DEFAULT 1,
    expires REAL NOT NULL DEFAULT 0, PRIMARY KEY (address, scope));
CREATE TABLE IF NOT EXISTS soft_bounce (
    address TEXT NOT NULL, scope TEXT NOT NULL DEFAULT '', at REAL NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS soft_bounce_addr ON soft_bounce (address, scope, at);
"""


def normalise(address: str) -> str:
    """Lower-cased, surrounding ``<>`` and white space removed."""
    return address.strip().strip("<>").strip().lower()


@dataclass(frozen=True, slots=True)
class SuppressionPolicy:
    soft_threshold: int = 3
    soft_window: float = 7 * 86400.0
    soft_duration: float = 30 * 86400.0
    hard_duration: float = 0.0  # 0: until removed
    complaint_duration: float = 0.0


@implementer(ISuppressionList)
class SuppressionStore:
    """SQLite-backed :class:`ISuppressionList`; the clock is injected (``seconds()``)."""

    def __init__(self, path: str, clock: Any, policy: SuppressionPolicy | None = None) -> None:
        self.clock = clock
        self.policy = policy or SuppressionPolicy()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- lookups --------------------------------------------------------------------------

    def is_suppressed(self, address: str, sender_domain: str | None = None) -> dict[str, Any] | None:
        scopes = ("", (sender_domain or "").lower()) if sender_domain else ("",)
        now = self.clock.seconds()
        row = self.db.execute(
            f"SELECT {', '.join(CSV_FIELDS)} FROM suppression WHERE address = ? AND scope IN ({','.join('?' * len(scopes))})"
            " AND (expires = 0 OR expires > ?) ORDER BY scope LIMIT 1",
            (normalise(address), *scopes, now),
        ).fetchone()
        return dict(zip(CSV_FIELDS, row, strict=True)) if row else None

    def entries(self) -> Iterator[dict[str, Any]]:
        for row in self.db.execute(f"SELECT {', '.join(CSV_FIELDS)} FROM suppression ORDER BY address, scope"):
            yield dict(zip(CSV_FIELDS, row, strict=True))

    def page(self, cursor: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` entries in (address, scope) order after ``cursor`` ("address\tscope")."""
        address, _, scope = cursor.partition("\t")
        rows = self.db.execute(
            f"SELECT {', '.join(CSV_FIELDS)} FROM suppression WHERE (address, scope) > (?, ?)"
            " ORDER BY address, scope LIMIT ?",
            (address, scope, limit),
        )
        return [dict(zip(CSV_FIELDS, row, strict=True)) for row in rows]

    def count(self) -> int:
        (n,) = self.db.execute("SELECT COUNT(*) FROM suppression").fetchone()
        return int(n)

    # -- changes --------------------------------------------------------------------------

    def add(
        self, address: str, reason: str, source: str, scope: str | None = None, expires: float | None = None
    ) -> dict[str, Any]:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
        address = normalise(address)
        if "@" not in address:
            raise ValueError(f"not an address: {address!r}")
        now = self.clock.seconds()
        self.db.execute(
            "INSERT INTO suppression (address, scope, reason, source, first_seen, last_seen, count, expires)"
            " VALUES (?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT (address, scope) DO UPDATE SET"
            " reason = excluded.reason, source = excluded.source, last_seen = excluded.last_seen,"
            " count = count + 1, expires = excluded.expires",
            (address, (scope or "").lower(), reason, source, now, now, expires or 0),
        )
        return self.is_suppressed(address, scope) or {}

    def remove(self, address: str, scope: str | None = None) -> bool:
        cur = self.db.execute(
            "DELETE FROM suppression WHERE address = ? AND scope = ?", (normalise(address), (scope or "").lower())
        )
        return cur.rowcount > 0

    def record_bounce(self, address: str, reason: str, hard: bool, scope: str | None = None) -> dict[str, Any] | None:
        """Apply the policy to one bounce; returns the suppression entry if it now applies."""
        now = self.clock.seconds()
        if hard:
            expires = now + self.policy.hard_duration if self.policy.hard_duration else 0
            return self.add(address, reason, "bounce", scope, expires)
        address = normalise(address)
        scope = (scope or "").lower()
        self.db.execute("INSERT INTO soft_bounce (address, scope, at, reason) VALUES (?, ?, ?, ?)", (address, scope, now, reason))
        self.db.execute("DELETE FROM soft_bounce WHERE at < ?", (now - self.policy.soft_window,))
        (count,) = self.db.execute(
            "SELECT COUNT(*) FROM soft_bounce WHERE address = ? AND scope = ? AND at >= ?",
            (address, scope, now - self.policy.soft_window),
        ).fetchone()
        if count >= self.policy.soft_threshold:
            return self.add(address, f"{reason} ({count} soft bounces)", "bounce", scope, now + self.policy.soft_duration)
        return None

    def record_complaint(self, address: str, reason: str = "complaint", scope: str | None = None) -> dict[str, Any]:
        now = self.clock.seconds()
        expires = now + self.policy.complaint_duration if self.policy.complaint_duration else 0
        return self.add(address, reason, "complaint", scope, expires)

    # -- CSV ------------------------------------------------------------------------------

    def export_csv(self, out: IO[str]) -> int:
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        n = 0
        for entry in self.entries():
            writer.writerow(entry)
            n += 1
        return n

    def import_csv(self, rows: Iterable[str]) -> int:
        """Rows with at least an ``address`` column (header line required); others optional."""
        reader = csv.DictReader(rows)
        if not reader.fieldnames or "address" not in reader.fieldnames:
            raise ValueError("CSV needs a header line with an 'address' column")
        n = 0
        for line, row in enumerate(reader, start=2):
            try:
                self.add(
                    row["address"],
                    row.get("reason") or "imported",
                    row.get("source") or "manual",
                    row.get("scope") or None,
                    float(row["expires"]) if row.get("expires") else None,
                )
            except (ValueError, TypeError) as e:
                raise ValueError(f"line {line}: {e}") from None
            n += 1
        return n
