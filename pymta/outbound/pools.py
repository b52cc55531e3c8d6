"""Source IP pools and warm-up: named sources (local address + EHLO name), weighted pools chosen
per sender domain, authenticated user or ``X-Pymta-Pool`` header, and per-source daily caps
that follow a warm-up ladder from a start date (counts kept in SQLite, so restarts keep them).

In a cluster (an :class:`pymta.interfaces.IClusterState`) the daily counts that caps are held
to are the cluster's: a message takes its place under the cap before it goes (given back when
nothing was delivered), so the nodes together never pass a cap; the ladder step each source is
on today is shared as a record. This node's SQLite still keeps its own counts and outcomes.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from twisted.internet import defer
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
    provider_ladders: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a ladder per provider

    def cap(self, today: date, offset: int = 0, provider: str | None = None) -> int | None:
        """The day's cap (for ``provider`` when it has its own ladder); ``offset`` steps it back."""
        ladder = self.provider_ladders.get(provider, ()) if provider else ()
        ladder = ladder or self.ladder
        if not ladder or self.start is None:
            return None
        day = (today - self.start).days - offset
        if day < 0:
            return ladder[0]
        return ladder[day] if day < len(ladder) else None

    def counter_key(self, provider: str | None) -> str:
        return f"{self.name}/{provider}" if provider and provider in self.provider_ladders else self.name


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
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS outcome (source TEXT, day TEXT, kind TEXT, count INTEGER, PRIMARY KEY (source, day, kind))"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS ladder (source TEXT PRIMARY KEY, offset INTEGER, checked TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS message (qid TEXT PRIMARY KEY, source TEXT, day TEXT)")

    def count(self, source: str, day: date) -> int:
        row = self.db.execute("SELECT count FROM sent WHERE source = ? AND day = ?", (source, day.isoformat())).fetchone()
        return row[0] if row else 0

    def add(self, source: str, day: date, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO sent (source, day, count) VALUES (?, ?, ?) ON CONFLICT (source, day) DO UPDATE SET count = count + ?",
            (source, day.isoformat(), n, n),
        )

    def outcome(self, source: str, day: date, kind: str, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO outcome (source, day, kind, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (source, day, kind) DO UPDATE SET count = count + ?",
            (source, day.isoformat(), kind, n, n),
        )

    def outcomes(self, source: str, day: date) -> dict[str, int]:
        rows = self.db.execute("SELECT kind, count FROM outcome WHERE source = ? AND day = ?", (source, day.isoformat()))
        return dict(rows.fetchall())

    def ladder(self, source: str) -> tuple[int, str | None]:
        row = self.db.execute("SELECT offset, checked FROM ladder WHERE source = ?", (source,)).fetchone()
        return (row[0], row[1]) if row else (0, None)

    def set_ladder(self, source: str, offset: int, checked: date) -> None:
        self.db.execute(
            "INSERT INTO ladder (source, offset, checked) VALUES (?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET offset = excluded.offset, checked = excluded.checked",
            (source, offset, checked.isoformat()),
        )

    def remember(self, qid: str, source: str, day: date) -> None:
        """Which source sent a message, so later bounces and complaints count against it."""
        self.db.execute("INSERT OR REPLACE INTO message (qid, source, day) VALUES (?, ?, ?)", (qid, source, day.isoformat()))

    def source_of(self, qid: str) -> str | None:
        row = self.db.execute("SELECT source FROM message WHERE qid = ?", (qid,)).fetchone()
        return row[0] if row else None

    def forget_before(self, day: date) -> None:
        self.db.execute("DELETE FROM message WHERE day < ?", (day.isoformat(),))

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
        bounce_rate: float = 0.05,
        deferral_rate: float = 0.20,
        min_sample: int = 20,
        complaint_rate: float = 0.001,
        cluster: Any = None,
    ) -> None:
        self.clock = clock
        self.cluster = cluster  # IClusterState: daily counts and ladder steps shared by the nodes
        if cluster is not None:
            cluster.watch("warmup_ladder", self.apply_shared_ladders)
        self.pools = pools
        self.by_sender_domain = {k.lower(): v for k, v in (by_sender_domain or {}).items()}
        self.by_user = by_user or {}
        self.default_pool = default_pool
        self.counter = counter
        self.rng = rng or random.Random()
        self.bounce_rate = bounce_rate
        self.deferral_rate = deferral_rate
        self.min_sample = min_sample
        self.complaint_rate = complaint_rate

    def offset(self, source: Source, today: date) -> int:
        """How far the ladder is held back, re-judged once a day from yesterday's outcomes."""
        if self.counter is None or not (source.ladder or source.provider_ladders):
            return 0
        offset, checked = self.counter.ladder(source.name)
        if checked == today.isoformat():
            return offset
        yesterday = self.counter.outcomes(source.name, today - timedelta(days=1))
        total = sum(n for kind, n in yesterday.items() if kind != "complaint")
        if total >= self.min_sample:
            bounces = yesterday.get("bounced", 0) / total
            deferrals = yesterday.get("deferred", 0) / total
            complaints = yesterday.get("complaint", 0) / total
            worst = max(bounces / self.bounce_rate, deferrals / self.deferral_rate, complaints / self.complaint_rate)
            if worst > 1:
                step = 2 if worst >= 2 else 1  # twice the threshold or more: step back; else hold
                offset += step
                log.warn("warm-up of {source} {what}: yesterday {bounces:.1%} bounced, {deferrals:.1%} deferred, "
                         "{complaints:.2%} complained", source=source.name, what="steps back" if step == 2 else "holds",
                         bounces=bounces, deferrals=deferrals, complaints=complaints, event="warmup")  # fmt: skip
        self.counter.set_ladder(source.name, offset, today)
        if self.cluster is not None:
            until = datetime.combine(today + timedelta(days=2), datetime.min.time(), UTC).timestamp()
            self.cluster.put_record("warmup_ladder", source.name, {"offset": offset, "checked": today.isoformat()}, until)
        return offset

    def apply_shared_ladders(self, records: dict[str, dict[str, Any]]) -> None:
        """The ladder steps the cluster's nodes judged: the latest judgement of each source holds here."""
        if self.counter is None:
            return
        for name, r in records.items():
            try:
                offset, checked = int(r["offset"]), date.fromisoformat(str(r["checked"]))
            except (KeyError, TypeError, ValueError):
                continue
            if self.counter.ladder(name) != (offset, checked.isoformat()):
                self.counter.set_ladder(name, offset, checked)

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

    def pick(self, envelope: Any, provider: str | None = None) -> Any:
        """(source, 0) to send now; (None, 0) when no pool applies; (None, until) when every
        source of the pool is at its daily cap. In a cluster, a Deferred of that, and the source
        has taken its place under the cluster's caps: call :meth:`unused` if nothing is sent."""
        if self.cluster is None:
            return self._pick(envelope, provider)
        return self._pick_shared(envelope, provider)

    @defer.inlineCallbacks
    def _pick_shared(self, envelope: Any, provider: str | None) -> Any:
        full: set[str] = set()
        pool = self.pool_for(envelope)
        for _ in range(len(pool.members) + 1 if pool else 1):
            source, until = self._pick(envelope, provider, full)
            counters = self.counters(source, provider) if source is not None else []
            if not counters or (yield self.cluster.take_quota(counters)):
                return source, until
            full.add(source.name)
        return None, self._tomorrow(self.today())

    def counters(self, source: Source, provider: str | None) -> list[tuple[str, int]]:
        """The cluster's daily (counter, cap) pairs a message through ``source`` counts in (cap -1:
        counted, no cap); none for a source without a ladder."""
        if not (source.ladder or source.provider_ladders):
            return []
        today = self.today()
        cap = source.cap(today, self.offset(source, today), provider)
        key = source.counter_key(provider)
        pairs = [(f"warmup:{today.isoformat()}:{key}", -1 if cap is None else cap)]
        if key != source.name:  # a provider's own ladder: the source's total counts it too
            pairs.append((f"warmup:{today.isoformat()}:{source.name}", -1))
        return pairs

    def unused(self, source: Source, provider: str | None = None) -> None:
        """Nothing went out through ``source`` after :meth:`pick` gave it: its place under the
        cluster's caps is given back."""
        if self.cluster is not None:
            counters = self.counters(source, provider)
            if counters:
                self.cluster.give_back_quota([key for key, _ in counters])

    @staticmethod
    def _tomorrow(today: date) -> float:
        return datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC).timestamp()

    def _pick(self, envelope: Any, provider: str | None, full: set[str] | frozenset[str] = frozenset()) -> Any:
        pool = self.pool_for(envelope)
        if pool is None:
            return None, 0.0
        today = self.today()
        candidates = []
        for source, weight in pool.members:
            if not source.usable or weight <= 0 or source.name in full:
                continue
            cap = source.cap(today, self.offset(source, today), provider)
            if (cap is not None and self.cluster is None and self.counter is not None
                    and self.counter.count(source.counter_key(provider), today) >= cap):  # fmt: skip
                continue
            candidates.append((source, weight))
        preferred = [c for c in candidates if c[0].name == envelope.extra.get("source")] if envelope.extra else []
        if preferred:
            candidates = preferred  # stay on the source a message started with, unless it is full
        elif envelope.extra and envelope.extra.get("source") and not pool.spill:
            candidates = []  # its source is full and the pool does not spill: wait for tomorrow
        if not candidates:
            return None, self._tomorrow(today)
        total = sum(w for _, w in candidates)
        point = self.rng.uniform(0, total)
        for source, weight in candidates:
            point -= weight
            if point <= 0:
                return source, 0.0
        return candidates[-1][0], 0.0

    def sent(self, source: Source, n: int = 1, qid: str | None = None, provider: str | None = None) -> None:
        if self.counter is not None and (source.ladder or source.provider_ladders):
            today = self.today()
            self.counter.add(source.name, today, n)
            if provider and provider in source.provider_ladders:
                self.counter.add(source.counter_key(provider), today, n)
            if qid:
                self.counter.remember(qid, source.name, today)

    def feedback(self, qid: str, kind: str) -> str | None:
        """A later bounce (``bounced``) or complaint (``complaint``) from the feedback loop about a
        message: counted against the source that sent it. Returns that source's name."""
        if self.counter is None:
            return None
        name = self.counter.source_of(qid)
        if name is not None:
            self.counter.outcome(name, self.today(), kind)
        return name

    def outcome(self, source: Source, code: int) -> None:
        """Count a per-recipient result of the source (delivered, deferred, bounced) for the ladder."""
        if self.counter is not None and (source.ladder or source.provider_ladders):
            kind = "delivered" if code < 400 else "deferred" if code < 500 else "bounced"
            self.counter.outcome(source.name, self.today(), kind)

    def unusable(self, source: Source, why: str) -> None:
        if source.usable:
            source.usable = False
            source.why_unusable = why
            log.error("source {source} ({address}) leaves its pools: {why}", source=source.name, address=source.address,
                      why=why, event="source_unusable")  # fmt: skip
