"""Notices envelopes that other processes (listener workers, a listener-only pymta) rename into
``incoming/``, through Linux inotify, so the queue manager picks them up at once."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import filepath

log = Logger(namespace="pymta.queue.watch")


class IncomingWatcher(service.Service):
    def __init__(self, incoming_dir: str, on_new: Callable[[str], Any], reactor: Any = None) -> None:
        self.incoming_dir = incoming_dir
        self.on_new = on_new
        self.reactor = reactor
        self.notifier: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # twisted's Service is untyped
        try:
            from twisted.internet import inotify

            # twisted's INotify is untyped
            self.notifier = inotify.INotify(reactor=self.reactor) if self.reactor else inotify.INotify()
            self.notifier.startReading()
            self.notifier.watch(
                filepath.FilePath(self.incoming_dir), mask=inotify.IN_MOVED_TO | inotify.IN_CREATE, callbacks=[self._event]
            )
        except Exception as e:  # no inotify here: mail from other processes waits for the next restart scan
            log.warn("cannot watch {path} for mail queued by other processes: {why}", path=self.incoming_dir, why=str(e))
            self.notifier = None

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # twisted's Service is untyped
        if self.notifier is not None:
            self.notifier.loseConnection()
            self.notifier = None

    def _event(self, _watch: Any, path: filepath.FilePath[Any], _mask: int) -> None:
        name = os.path.basename(path.path).decode() if isinstance(path.path, bytes) else os.path.basename(path.path)
        if not name.startswith("."):
            self.on_new(name)
