"""Suppression shared by the nodes of a cluster: every change made on a node goes into a Redis
stream, and each node applies the others' changes to its own SQLite store, its local replica, so a
lookup never waits for the network and a node that was away catches up from the stream.

Every change made here first goes into an outbox table of the same SQLite file, in order
(bounded), and leaves it once Redis has it: changes made while Redis is unreachable, or by
``pymta-suppress`` beside a running node, or before a restart, are pushed when it answers again
(by the command itself, else by the node's next round). The position read in the stream is kept
beside the SQLite file, so a restart resumes there.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from pymta.feedback.suppression import SuppressionStore

log = Logger(namespace="pymta.state.replica")

STREAM = "pymta:suppression"
STREAM_MAXLEN = 1_000_000  # entries the stream keeps (approximately): a node away longer reloads by CSV
READ_BATCH = 500
MAX_PENDING = 100_000  # changes held in the outbox while Redis is unreachable
PUSH_BATCH = 1000  # changes pushed per round


class ReplicatedSuppressionStore(SuppressionStore):
    """A :class:`SuppressionStore` whose changes are published to, and read from, the cluster."""

    def __init__(self, path: str, clock: Any, policy: Any = None, cluster: Any = None, poll: float = 0.2) -> None:
        super().__init__(path, clock, policy)
        self.cluster = cluster
        self.poll = poll
        self.position_path = path + ".stream"
        self.position = self._read_position()
        self.db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, change TEXT NOT NULL)")
        self.applied = 0  # changes of other nodes applied here
        self._loop: Any = None
        self._busy = False
        self._push_lock = defer.DeferredLock()

    # -- changes made here ----------------------------------------------------------------

    def add(self, address: str, reason: str, source: str, scope: str | None = None,
            expires: float | None = None) -> dict[str, Any]:  # fmt: skip
        entry = super().add(address, reason, source, scope, expires)
        self._publish({"op": "add", "address": entry.get("address", address), "scope": (scope or "").lower(),
                       "reason": reason, "source": source, "expires": repr(expires or 0)})  # fmt: skip
        return entry

    def remove(self, address: str, scope: str | None = None) -> bool:
        removed = super().remove(address, scope)
        self._publish({"op": "remove", "address": address, "scope": (scope or "").lower()})
        return removed

    def _publish(self, change: dict[str, str]) -> None:
        if self.cluster is None:
            return
        change["node"] = self.cluster.node
        waiting = self.pending_count()
        if waiting >= MAX_PENDING:
            log.warn("suppression changes waiting for Redis: {count}, dropping the oldest", count=waiting,
                     event="suppression_pending_full")  # fmt: skip
            self.db.execute("DELETE FROM outbox WHERE seq = (SELECT MIN(seq) FROM outbox)")
        self.db.execute("INSERT INTO outbox (change) VALUES (?)", (json.dumps(change),))
        self.push()

    def pending_count(self) -> int:
        """Changes made here that Redis does not have yet."""
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def push(self) -> defer.Deferred[Any]:
        """Send the outbox to the stream in order, one push at a time (a caller waits for the one
        in flight); what cannot be sent stays for the next round."""
        return self._push_lock.run(self._push_pending)

    @defer.inlineCallbacks
    def _push_pending(self) -> Any:
        for _ in range(MAX_PENDING // PUSH_BATCH + 1):
            if not self.cluster.shared:
                return
            rows = self.db.execute("SELECT seq, change FROM outbox ORDER BY seq LIMIT ?", (PUSH_BATCH,)).fetchall()
            if not rows:
                return
            for seq, text in rows:
                args: list[Any] = ["XADD", STREAM, "MAXLEN", "~", str(STREAM_MAXLEN), "*"]
                for k, v in json.loads(text).items():
                    args += [k, str(v)]
                try:
                    yield self.cluster.command(*args)
                except Exception as e:
                    log.info("suppression change kept until Redis answers: {why}", why=str(e)[:200])
                    return
                self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    # -- changes made elsewhere -----------------------------------------------------------

    def start(self) -> None:
        if self.cluster is None:
            return
        self._loop = task.LoopingCall(self.sync)
        self._loop.clock = self.clock
        self._loop.start(self.poll, now=True).addErrback(lambda f: log.failure("suppression sync", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    @defer.inlineCallbacks
    def sync(self) -> Any:
        """Push what waits, then apply what other nodes changed since our position (one round)."""
        if self.cluster is None or not self.cluster.shared or self._busy:
            return
        self._busy = True
        try:
            yield self.push()
            for _ in range(100):  # bounded catch-up per round: 100 batches
                try:
                    reply = yield self.cluster.command("XREAD", "COUNT", str(READ_BATCH), "STREAMS", STREAM,
                                                       self.position)  # fmt: skip
                except Exception:
                    return
                entries = _entries(reply)
                if not entries:
                    return
                for entry_id, change in entries:
                    if change.get("node") != self.cluster.node:
                        self._apply(change)
                    self.position = entry_id
                self._write_position()
                if len(entries) < READ_BATCH:
                    return
        finally:
            self._busy = False

    def _apply(self, change: dict[str, str]) -> None:
        try:
            if change.get("op") == "add":
                expires = float(change.get("expires") or 0)
                SuppressionStore.add(self, change["address"], change.get("reason", ""), change["source"],
                                     change.get("scope") or None, expires or None)  # fmt: skip
            elif change.get("op") == "remove":
                SuppressionStore.remove(self, change["address"], change.get("scope") or None)
            self.applied += 1
        except (KeyError, ValueError) as e:
            log.warn("ignoring a malformed suppression change from the cluster: {why}", why=str(e)[:200],
                     event="suppression_bad_change")  # fmt: skip

    def _read_position(self) -> str:
        try:
            with open(self.position_path, encoding="ascii") as f:
                text = f.read(64).strip()
        except OSError:
            return "0-0"
        return text if text.replace("-", "").isdigit() else "0-0"

    def _write_position(self) -> None:
        tmp = self.position_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(self.position)
        os.replace(tmp, self.position_path)

    def close(self) -> None:
        self.stop()
        super().close()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """XREAD's reply [[stream, [[id, [k, v, ...]], ...]]] as (id, fields) pairs."""
    out: list[tuple[str, dict[str, str]]] = []
    for _stream, items in reply or []:
        for entry_id, flat in items or []:
            fields = [_text(x) for x in flat or []]
            out.append((_text(entry_id), dict(zip(fields[::2], fields[1::2], strict=False))))
    return out


def push_outbox(store: ReplicatedSuppressionStore, reactor: Any) -> int:
    """For a command-line tool: run ``reactor`` until ``store``'s outbox is in the stream or Redis
    does not answer (each step bounded by the cluster's timeout); the changes still waiting."""
    left: list[int] = []

    @defer.inlineCallbacks
    def run() -> Any:
        try:
            yield store.cluster.start()
            yield store.push()
        finally:
            left.append(store.pending_count())
            try:
                yield store.cluster.stop()
            finally:
                reactor.stop()

    reactor.callWhenRunning(lambda: run().addErrback(lambda f: log.failure("pushing suppression changes", f)))
    reactor.run(installSignalHandlers=False)
    return left[0] if left else store.pending_count()
