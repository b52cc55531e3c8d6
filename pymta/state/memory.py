"""In-process inbound state: the counters of one process only (the fake the contract tests
hold to the same behaviour as the SQLite backend)."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from zope.interface import implementer

from pymta.interfaces import IInboundState
from pymta.rate import Rate, gcra_step
from pymta.state import greylist_step


@implementer(IInboundState)
class MemoryInboundState:
    """Dictionaries bounded by ``max_keys`` each (least recently used dropped)."""

    def __init__(self, clock: Any, max_keys: int = 1_000_000) -> None:
        self.clock = clock
        self.owner = os.getpid()
        self.max_keys = max_keys
        self.connections: dict[str, int] = {}
        self.tats: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.triples: OrderedDict[tuple[str, str, str], tuple[float, float]] = OrderedDict()

    def acquire_connection(self, key: str, limit: int) -> bool:
        count = self.connections.get(key, 0)
        if count >= limit:
            return False
        self.connections[key] = count + 1
        return True

    def release_connection(self, key: str) -> None:
        count = self.connections.get(key, 0) - 1
        if count > 0:
            self.connections[key] = count
        else:
            self.connections.pop(key, None)

    def take(self, name: str, key: str, rate: Rate) -> float:
        tat, wait = gcra_step(self.tats.get((name, key)), self.clock.seconds(), rate)
        if not wait:
            self._put(self.tats, (name, key), tat)
        return wait

    def greylist(self, triple: tuple[str, str, str], delay: float, expire: float, lifetime: float) -> float:
        entry, wait = greylist_step(self.triples.get(triple), self.clock.seconds(), delay, expire, lifetime)
        self._put(self.triples, triple, entry)
        return wait

    def _put(self, table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self.max_keys:
            table.popitem(last=False)

    def release_owner(self, owner: int) -> None:
        pass  # one process: nothing of another owner is counted here

    def clear_connections(self) -> None:
        self.connections.clear()

    def close(self) -> None:
        pass
