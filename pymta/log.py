"""JSON-lines log observer for ``twistd --logger=pymta.log.observer``.

twistd calls the named object with no arguments, so :func:`observer` is a factory. Each event
becomes one JSON object on one line: ``time`` (ISO 8601 UTC), ``level``, ``namespace``,
``message`` (the formatted text) and every named field of the event that JSON can carry
(``qid``, ``client``, ``sender``, ``recipients``, ``size``, ``code``, ``enhanced`` ...).
Output goes to ``$PYMTA_LOG_FILE`` when set, else standard output; :func:`reopen_log_files`
(SIGUSR1 or SIGHUP) reopens that file after logrotate has renamed it.

Twisted's own per-connection "Starting factory" / "Stopping factory" lines (outbound HTTPS for
MTA-STS, client endpoints) are left out: one pair per outbound connection is noise, not news.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.logger import FileLogObserver, FilteringLogObserver, Logger, PredicateResult, formatEvent
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.logger import ILogFilterPredicate, ILogObserver

_SKIP_PREFIXES = ("log_", "isError", "message", "format", "system", "why", "failure")
_FACTORY_LINES = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


_debug = {"on": False}  # [log] debug, set once per process at start


def set_debug(on: bool) -> None:
    _debug["on"] = bool(on)


def debug(logger: Logger, fmt: str, **fields: Any) -> None:
    """``logger.debug`` for the per-connection and per-rule detail operators ask for with
    ``[log] debug = true``; otherwise nothing is emitted, so no log observer formats or writes a
    line per message for it (a reused connection is one such line per delivery)."""
    if _debug["on"]:
        logger.debug(fmt, **fields)


def not_factory_noise(event: dict[str, Any]) -> PredicateResult:
    """No for Twisted's factory start/stop lines of its own factories (ours, the listeners, stay)."""
    if event.get("log_format") in _FACTORY_LINES and not str(event.get("log_namespace", "")).startswith("pymta."):
        return cast(PredicateResult, PredicateResult.no)
    return cast(PredicateResult, PredicateResult.maybe)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_json(event: dict[str, Any]) -> str:
    """One log event -> one JSON line (with its newline)."""
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, UTC).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith(_SKIP_PREFIXES) or key in record:
            continue
        record[key] = _jsonable(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["error"] = failure.getErrorMessage()
        record["error_type"] = failure.type.__name__ if failure.type else ""
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


class ReopenableFile:
    """A line-buffered text file that :meth:`reopen` replaces by a new file at the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()  # events may be logged from threads while the file is reopened
        self._file = self._open()

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def reopen(self) -> None:
        new = self._open()  # an error leaves the old file in use
        with self._lock:
            old, self._file = self._file, new
        old.close()


_reopenable: list[ReopenableFile] = []


def reopen_log_files() -> list[str]:
    """Reopen ``$PYMTA_LOG_FILE`` (if this process logs to it); the paths reopened."""
    done = []
    for f in _reopenable:
        try:
            f.reopen()
        except OSError as e:
            sys.stderr.write(f"pymta: cannot reopen the log file {f.path}: {e.strerror}\n")
            continue
        done.append(f.path)
    return done


def observer(out: IO[str] | None = None) -> FilteringLogObserver:
    """The factory twistd's ``--logger`` calls."""
    if out is None:
        path = os.environ.get("PYMTA_LOG_FILE")
        if path:
            reopenable = ReopenableFile(path)
            _reopenable.append(reopenable)
            out = reopenable  # type: ignore[assignment]
        else:
            out = sys.stdout
    # zope.interface declarations: mypy sees no structural match without a plugin
    observer = cast("ILogObserver", FileLogObserver(cast(IO[Any], out), event_as_json))
    return FilteringLogObserver(observer, [cast("ILogFilterPredicate", not_factory_noise)])
