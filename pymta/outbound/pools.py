"""Source IP pools and warm-up: named sources (local address + EHLO name), weighted pools chosen
per sender domain, authenticated user or ``X-Pymta-Pool`` header, and per-source daily caps
that follow a warm-up ladder from a start date (counts kept in SQLite, so restarts keep them).
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="pymta.outbound.pools")


@dataclass
class Source:
    name: str
    address: str
    ehlo: str
    ladder: tuple[int, ...] = ()  # messages per day, day 1, 2, ...; after the last step: no cap
    start: date | None = None
    usable: bool = True  # False once it could not be bound
    why_unusable: str = ""

    def cap(self, today: date) -> int | None:
        if not self.ladder or self.start is None:
            return None
        day = (today - self.start).days
        if day < 0:
            return self.ladder[0]
        return self.ladder[day] if day < len(self.ladder) else None


@dataclass
class Pool:
    name: str
    members: list[tuple[Source, int]] = field(default_factory=list)  # (source, weight)
    spill: bool = False  # over its cap, a source's mail may go out through another source of the pool


class WarmupCounter:
    """Messages sent per source and day (UTC), in SQLite."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sent (source TEXT, day TEXT, count INTEGER, PRIMARY KEY (source, day))")

    def count(self, source: str, day: date) -> int:
        row = self.db.execute("SELECT count FROM sent WHERE source = ? AND day = ?", (source, day.isoformat())).fetchone()
        return row[0] if row else 0

    def add(self, source: str, day: date, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO sent (source, day, count) VALUES (?, ?, ?) ON CONFLICT (source, day) DO UPDATE SET count = count + ?",
            (source, day.isoformat(), n, n),
        )

    def close(self) -> None:
        self.db.close()


class SourceSelector:
    """Picks the source for one delivery attempt, or says until when the mail must wait."""

    def __init__(
        self,
        clock: Any,
        pools: dict[str, Pool],
        by_sender_domain: dict[str, str] | None = None,
        by_user: dict[str, str] | None = None,
        default_pool: str | None = None,
        counter: WarmupCounter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.pools = pools
        self.by_sender_domain = {k.lower(): v for k, v in (by_sender_domain or {}).items()}
        self.by_user = by_user or {}
        self.default_pool = default_pool
        self.counter = counter
        self.rng = rng or random.Random()

    def pool_for(self, envelope: Any) -> Pool | None:
        name = envelope.extra.get("pool") if envelope.extra else None
        if name not in self.pools:
            name = None
        if name is None and envelope.auth_user:
            name = self.by_user.get(envelope.auth_user)
        if name is None and envelope.sender:
            name = self.by_sender_domain.get(envelope.sender.rpartition("@")[2].lower())
        return self.pools.get(name or self.default_pool or "")

    def today(self) -> date:
        return datetime.fromtimestamp(self.clock.seconds(), UTC).date()

    def pick(self, envelope: Any) -> tuple[Source | None, float]:
        """(source, 0) to send now; (None, 0) when no pool applies; (None, until) when every
        source of the pool is at its daily cap."""
        pool = self.pool_for(envelope)
        if pool is None:
            return None, 0.0
        today = self.today()
        candidates = []
        for source, weight in pool.members:
            if not source.usable or weight <= 0:
                continue
            cap = source.cap(today)
            if cap is not None and self.counter is not None and self.counter.count(source.name, today) >= cap:
                continue
            candidates.append((source, weight))
        preferred = [c for c in candidates if c[0].name == envelope.extra.get("source")] if envelope.extra else []
        if preferred:
            candidates = preferred  # stay on the source a message started with, unless it is full
        elif envelope.extra and envelope.extra.get("source") and not pool.spill:
            candidates = []  # its source is full and the pool does not spill: wait for tomorrow
        if not candidates:
            tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC).timestamp()
            return None, tomorrow
        total = sum(w for _, w in candidates)
        point = self.rng.uniform(0, total)
        for source, weight in candidates:
            point -= weight
            if point <= 0:
                return source, 0.0
        return candidates[-1][0], 0.0

    def sent(self, source: Source, n: int = 1) -> None:
        if self.counter is not None and source.ladder:
            self.counter.add(source.name, self.today(), n)

    def unusable(self, source: Source, why: str) -> None:
        if source.usable:
            source.usable = False
            source.why_unusable = why
            log.error("source {source} ({address}) leaves its pools: {why}", source=source.name, address=source.address,
                      why=why, event="source_unusable")  # fmt: skip
