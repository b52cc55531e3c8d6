"""The accounting log: append-only JSON lines at state_dir/log/accounting.jsonl, one record per
event (received, delivered, deferred, bounced, expired, relayed), flushed in groups."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="pymta.admin.accounting")


class AccountingLog:
    """``record(event, **fields)`` appends ``{"time", "event", ...fields}``; writes are buffered and
    flushed within ``flush_interval`` seconds (on the injected clock) or when the buffer is large."""

    def __init__(self, path: str, clock: Any, flush_interval: float = 0.5, max_buffer: int = 256) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.clock = clock
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._file = open(path, "a", encoding="utf-8")
        self._buffer: list[str] = []
        self._call: Any = None

    def record(self, event: str, **fields: Any) -> None:
        now = self.clock.seconds()
        record = {"time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        self._buffer.append(json.dumps(record, ensure_ascii=False, default=str))
        if len(self._buffer) >= self.max_buffer:
            self.flush()
        elif self._call is None:
            self._call = self.clock.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self._buffer or self._file.closed:
            return
        data, self._buffer = "\n".join(self._buffer) + "\n", []
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as e:
            log.error("cannot write the accounting log {path}: {why}", path=self.path, why=str(e))

    def close(self) -> None:
        self.flush()
        self._file.close()
