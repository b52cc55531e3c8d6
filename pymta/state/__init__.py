"""Shared state behind :class:`pymta.interfaces.IInboundState`: ``memory`` (one process, the
fake for tests) and ``local`` (SQLite in WAL mode under state_dir, shared by the listener
processes of one node and kept across restarts). Both make their decisions with the pure
steps below, so a backend only stores and fetches."""

from __future__ import annotations


def greylist_step(
    entry: tuple[float, float] | None, now: float, delay: float, expire: float, lifetime: float
) -> tuple[tuple[float, float], float]:
    """One greylisting decision from the stored (first_seen, pass_until) of a triple (None: new).

    Returns the entry to store and 0.0 when the triple passes, else the seconds to wait.
    A passed triple passes until ``pass_until`` (renewed on every pass); an unpassed one
    older than ``expire`` starts again.
    """
    if entry is not None and entry[1] >= now:
        return (entry[0], now + lifetime), 0.0
    if entry is None or now - entry[0] > expire:
        entry = (now, 0.0)
    waited = now - entry[0]
    if waited >= delay:
        return (entry[0], now + lifetime), 0.0
    return entry, delay - waited


def keep_until(entry: tuple[float, float], expire: float) -> float:
    """When a greylist entry may be forgotten: after its pass, or after ``expire`` unpassed."""
    return max(entry[1], entry[0] + expire)
