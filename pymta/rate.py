"""Rates: ``"100/s"``, ``"600/min, burst=20"`` parsed, and GCRA limiters keyed by anything, on an
injected clock (inbound client limits and outbound shaping use the same code)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*(?:,\s*burst\s*=\s*(\d+)\s*)?$")
_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
            "d": 86400, "day": 86400}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``period`` seconds, allowing ``burst`` at once."""

    count: float
    period: float
    burst: int = 1

    @property
    def interval(self) -> float:
        """Seconds between events at the steady rate (the GCRA emission interval)."""
        return self.period / self.count

    def scaled(self, share: float) -> Rate:
        return Rate(max(self.count * share, 1e-9), self.period, self.burst)

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h", 86400: "day"}.get(int(self.period), f"{self.period:g}s")
        return f"{self.count:g}/{unit}" + (f", burst={self.burst}" if self.burst != 1 else "")


def parse_rate(text: Any) -> Rate:
    """``"100/s"``, ``"60/min"``, ``"5000/day"``, ``"600/min, burst=20"``; ValueError otherwise."""
    if not isinstance(text, str) or not (m := _RATE.match(text)):
        raise ValueError(f"expected a rate like \"100/s\", \"60/min\" or \"600/min, burst=20\", got {text!r}")
    count = float(m.group(1))
    if count <= 0:
        raise ValueError("a rate must be above zero")
    burst = int(m.group(3)) if m.group(3) else 1
    if burst < 1:
        raise ValueError("burst must be at least 1")
    return Rate(count, float(_PERIODS[m.group(2)]), burst)


def gcra_step(tat: float | None, now: float, rate: Rate, cost: int = 1) -> tuple[float, float]:
    """One GCRA decision from the stored theoretical arrival time (None: never seen):
    (the TAT to store, 0.0) when allowed, else (``tat`` unchanged, seconds to wait)."""
    interval = rate.interval
    start = now if tat is None else max(tat, now)
    new_tat = start + interval * cost
    allow_at = new_tat - interval * rate.burst
    if allow_at > now + 1e-9:
        return (now if tat is None else tat), allow_at - now
    return new_tat, 0.0


class KeyedLimiter:
    """GCRA per key: :meth:`take` says whether one event may happen now, else how long to wait.

    Keeps at most ``max_keys`` keys (least recently used dropped: a dropped key starts afresh,
    which errs on the side of allowing).
    """

    def __init__(self, rate: Rate, clock: Any, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.clock = clock
        self.max_keys = max_keys
        self._tat: OrderedDict[Hashable, float] = OrderedDict()  # theoretical arrival time per key

    def take(self, key: Hashable, cost: int = 1) -> float:
        """0.0 if allowed now (and recorded); else the seconds until it would be allowed."""
        now = self.clock.seconds()
        new_tat, wait = gcra_step(self._tat.get(key), now, self.rate, cost)
        if wait:
            return wait
        self._tat[key] = new_tat
        self._tat.move_to_end(key)
        if len(self._tat) > self.max_keys:
            self._tat.popitem(last=False)
        return 0.0

    def set_rate(self, rate: Rate) -> None:
        self.rate = rate


def parse_share(text: Any) -> float:
    """``"50%"`` -> 0.5 (above 0% and at most 100%); ValueError otherwise."""
    if not isinstance(text, str) or not re.match(r"^\s*\d{1,3}(\.\d+)?\s*%\s*$", text):
        raise ValueError(f"expected a share like \"50%\", got {text!r}")
    value = float(text.strip().rstrip("%")) / 100
    if not 0 < value <= 1:
        raise ValueError("a share must be above 0% and at most 100%")
    return value


def parse_window(text: str) -> tuple[int, int]:
    """``"08:00-20:00"`` -> (480, 1200); a window may cross midnight (``"22:00-06:00"``)."""
    m = re.match(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$", text or "")
    if not m:
        raise ValueError(f"expected a window like \"08:00-20:00\", got {text!r}")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if not (0 <= start < 1440 and 0 <= end <= 1440) or start == end or int(m[2]) > 59 or int(m[4]) > 59:
        raise ValueError(f"not a usable window {text!r}")
    return start, end
