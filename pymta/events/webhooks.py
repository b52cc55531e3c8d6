"""Signed webhooks: each ``[[webhooks]]`` endpoint follows the event journal from its own durable
cursor and POSTs batches in order, one request in flight, at least once.

2xx: the batch is done (the cursor is fsynced past it). 408, 429, 5xx, 3xx, timeouts and
connection errors: retried with jittered exponential backoff; events older than ``max_age``
are then given up with an error record. Any other 4xx: the batch is dropped with an error
record and counted. Error records go to ``state_dir/events/webhooks/NAME.dropped.jsonl``.
Outbound HTTP is treq on Twisted's Agent (TLS verified with the system trust store).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
from datetime import datetime
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.events.journal import EventJournal, fsync_dir
from pymta.httpbody import BytesProducer

log = Logger(namespace="pymta.events.webhooks")

MAX_RESPONSE = 64 * 1024  # of a receiver's answer body we read (and discard)
RETRY_CODES = frozenset({408, 429})


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Pymta-Signature`` value: ``t=UNIX,v1=HEX`` (HMAC-SHA256 of ``t + "." + body``)."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does: a valid signature made within ``tolerance`` seconds of ``now``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, t, body), header)


def load_secret(hook: Any) -> bytes:
    """The endpoint's secret (``secret`` or the first line of ``secret_file``)."""
    if hook.secret:
        return cast(bytes, hook.secret.encode())
    try:
        with open(hook.secret_file, encoding="utf-8") as f:
            text = f.readline().strip()
    except OSError as e:
        raise OSError(e.errno, f"webhooks {hook.name}: cannot read secret_file: {e.strerror}", hook.secret_file) from None
    if len(text.encode()) < 16:
        raise OSError(0, f"webhooks {hook.name}: secret_file holds less than 16 characters", hook.secret_file)
    return text.encode()


def _event_time(record: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(record["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


class Cursor:
    """``state_dir/events/webhooks/NAME.json``: the last seq done and the counts, replaced atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seq = 0
        self.delivered = 0
        self.dropped = 0
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            self.seq, self.delivered, self.dropped = int(data["seq"]), int(data["delivered"]), int(data["dropped"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("webhook cursor {path} unreadable ({why}): starting from the journal's beginning",
                      path=path, why=str(e))  # fmt: skip

    def snapshot(self) -> dict[str, int]:
        return {"seq": self.seq, "delivered": self.delivered, "dropped": self.dropped}

    def save(self, snapshot: dict[str, int]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(snapshot, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path))


def _append_fsync(path: str, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


class WebhookSender:
    """One endpoint. ``post(url, body, headers)`` returns a Deferred of (status, None)."""

    def __init__(self, hook: Any, secret: bytes, journal: EventJournal, directory: str, clock: Any,
                 post: Any, run: Any, rng: random.Random | None = None) -> None:  # fmt: skip
        self.hook = hook
        self.name = hook.name
        self.secret = secret
        self.journal = journal
        self.clock = clock
        self.post = post
        self.run = run  # runs blocking file work off the reactor: run(f, *args) -> Deferred
        self.rng = rng or random.Random()
        self.types = frozenset(hook.events) if hook.events else None
        self.cursor = Cursor(os.path.join(directory, f"{hook.name}.json"))
        self.dropped_path = os.path.join(directory, f"{hook.name}.dropped.jsonl")
        self.failures = 0
        self.last_error: str | None = None
        self.next_attempt: float | None = None
        self._busy = False
        self._timer: Any = None  # the retry backoff
        self._linger: Any = None  # waiting for a not-full batch to fill
        self._inflight: defer.Deferred[Any] | None = None
        self._saving: defer.Deferred[Any] | None = None
        self._save_again = False
        self.running = False

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.wake()

    def stop(self) -> None:
        self.running = False
        for timer in (self._timer, self._linger):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._linger = None
        if self._inflight is not None:
            self._inflight.cancel()

    def wake(self, _: Any = None) -> None:
        """Sends a full batch at once; a batch that is not full after ``linger`` seconds (so at
        a low or moderate rate one POST and one cursor save carry many events, not one each)."""
        if not self.running or self._busy or self._timer is not None:
            return
        backlog = self.journal.durable_seq - self.cursor.seq
        if backlog <= 0:
            return
        if backlog < self.hook.batch_size and self.hook.linger > 0:
            if self._linger is None:
                self._linger = self.clock.callLater(self.hook.linger, self._send_now)
            return
        self._send_now()

    def _send_now(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if not self.running or self._busy or self._timer is not None:
            return
        self._busy = True
        d = self._round()
        d.addErrback(lambda f: log.failure("webhook {name} failed", f, name=self.name))
        d.addBoth(self._idle)

    def _idle(self, _: Any) -> None:
        self._busy = False
        self.wake()

    def _retry_later(self) -> None:
        self.failures += 1
        base = min(self.hook.retry_max, self.hook.retry_initial * 2 ** min(self.failures - 1, 30))
        delay = base * (0.5 + self.rng.random() / 2)
        self.next_attempt = self.clock.seconds() + delay
        self._timer = self.clock.callLater(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        self.next_attempt = None
        self._send_now()  # a retry does not linger again

    @defer.inlineCallbacks
    def _round(self) -> Any:
        while self.running:
            records = self.journal.read(self.cursor.seq, self.hook.batch_size)
            if not records:
                return
            upto = records[-1]["seq"]
            batch = [r for r in records if self.types is None or r.get("type") in self.types]
            if not batch:  # nothing this endpoint wants: move on (saved with the next batch done)
                self.cursor.seq = upto
                continue
            status, why = yield self._send(batch)
            if not self.running:  # stopped while posting: the batch goes again after the restart
                return
            if status is not None and 200 <= status < 300:
                self._done(upto, delivered=len(batch))
                if self.journal.durable_seq - self.cursor.seq < self.hook.batch_size:
                    return  # the rest is not a full batch: ``wake`` lingers for more
                continue
            if status is not None and 400 <= status < 500 and status not in RETRY_CODES:
                yield self._drop(batch, upto, f"HTTP {status}")
                continue
            self.last_error = why
            now = self.clock.seconds()
            old = [r for r in batch if (_event_time(r) or now) < now - self.hook.max_age]
            if old and len(old) == len(batch):
                yield self._drop(batch, upto, f"max_age {int(self.hook.max_age)}s reached; last: {why}")
                continue
            if old:  # the aged ones give up now; the rest are retried (in order) right after
                yield self._drop(old, old[-1]["seq"], f"max_age {int(self.hook.max_age)}s reached; last: {why}")
            log.warn("webhook {name}: {n} event(s) not accepted ({why}); retrying", name=self.name, n=len(batch),
                     why=why, event="webhook_retry")  # fmt: skip
            self._retry_later()
            return

    def _send(self, batch: list[dict[str, Any]]) -> defer.Deferred[Any]:
        """(status, description) of one POST; status None for a timeout or connection error."""
        payload = batch if self.hook.batch_size > 1 else batch[0]
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "pymta-webhooks",
            "X-Pymta-Signature": sign(self.secret, int(self.clock.seconds()), body),
            "X-Pymta-Event-Count": str(len(batch)),
        }
        d: defer.Deferred[Any] = self.post(self.hook.url, body, headers)
        d.addTimeout(self.hook.timeout, self.clock)
        self._inflight = d

        def answered(status: int) -> tuple[int, str]:
            return status, f"HTTP {status}"

        def failed(f: Any) -> tuple[None, str]:
            if f.check(defer.TimeoutError, defer.CancelledError):
                return None, f"no answer in {self.hook.timeout:g}s"
            return None, f.getErrorMessage() or f.type.__name__

        def cleared(result: Any) -> Any:
            self._inflight = None
            return result

        return d.addCallbacks(answered, failed).addBoth(cleared)

    def _done(self, upto: int, delivered: int = 0, dropped: int = 0) -> None:
        self.cursor.seq = upto
        self.cursor.delivered += delivered
        self.cursor.dropped += dropped
        self.failures = 0
        if delivered:
            self.last_error = None
        self._save_cursor()

    def _save_cursor(self) -> None:
        """Saves run one at a time, off the reactor, while the next batch is already being
        posted (a crash before a save only repeats batches: at least once, never lost)."""
        if self._saving is not None:
            self._save_again = True
            return
        self._save_again = False
        self._saving = self.run(self.cursor.save, self.cursor.snapshot())

        def saved(result: Any) -> None:
            self._saving = None
            if isinstance(result, Failure):
                log.error("webhook {name}: cannot save the cursor: {why}", name=self.name, why=result.getErrorMessage())
            if self._save_again:
                self._save_cursor()

        self._saving.addBoth(saved)

    def flush(self) -> defer.Deferred[Any]:
        """Fires once the cursor as it is now is on disk."""
        if self._saving is None:
            return defer.succeed(None)
        done: defer.Deferred[Any] = defer.Deferred()
        self._saving.addBoth(lambda _: done.callback(None))  # runs after ``saved``, which may start the next save
        return done.addCallback(lambda _: self.flush())

    @defer.inlineCallbacks
    def _drop(self, batch: list[dict[str, Any]], upto: int, why: str) -> Any:
        self.last_error = why
        log.error("webhook {name}: dropped {n} event(s) ({why}), first {first}", name=self.name, n=len(batch),
                  why=why, first=batch[0].get("event_id"), event="webhook_dropped", webhook=self.name)  # fmt: skip
        now = self.clock.seconds()
        lines = [json.dumps({"dropped_at": now, "webhook": self.name, "why": why, "event": r},
                            ensure_ascii=False, separators=(",", ":")) for r in batch]  # fmt: skip
        yield self.run(_append_fsync, self.dropped_path, lines)
        self._done(upto, dropped=len(batch))

    # -- state ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.hook.url,
            "backlog": max(0, self.journal.last_seq - self.cursor.seq),
            "cursor": self.cursor.seq,
            "delivered": self.cursor.delivered,
            "dropped": self.cursor.dropped,
            "failures": self.failures,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt,
        }


def treq_post(reactor: Any, connect_timeout: float = 10.0) -> Any:
    """A ``post(url, body, headers)`` on treq with a persistent pool; TLS is verified by Agent's
    default policy (the system trust store, service_identity host name checks)."""
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IAgent, IBodyProducer

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    client = HTTPClient(cast(IAgent, Agent(reactor, connectTimeout=connect_timeout, pool=pool)))

    @defer.inlineCallbacks
    def post(url: str, body: bytes, headers: dict[str, str]) -> Any:
        multi: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in headers.items()}
        response = yield client.post(url, data=cast(IBodyProducer, BytesProducer(body)), headers=multi)
        seen = [0]

        def collect(data: bytes) -> None:
            seen[0] += len(data)  # read and discarded (bounded memory whatever the receiver sends)

        with contextlib.suppress(Exception):  # the status is what counts; a broken body after it is not
            yield treq.collect(response, collect)
        return response.code

    post.pool = pool  # type: ignore[attr-defined]
    return post


class WebhookService(service.Service):
    """Every ``[[webhooks]]`` endpoint, woken by the journal after each fsync."""

    def __init__(self, hooks: tuple[Any, ...], journal: EventJournal, directory: str, clock: Any,
                 post: Any, reactor: Any = None, threadpool: Any = None) -> None:  # fmt: skip
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.journal = journal
        self.post = post

        def run(f: Any, *args: Any) -> defer.Deferred[Any]:
            if threadpool is not None and reactor is not None:
                return threads.deferToThreadPool(reactor, threadpool, f, *args)
            return defer.maybeDeferred(f, *args)

        self.senders = [WebhookSender(h, load_secret(h), journal, directory, clock, post, run) for h in hooks]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.journal.listeners.append(self._journal_synced)
        for sender in self.senders:
            sender.start()

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        if self._journal_synced in self.journal.listeners:
            self.journal.listeners.remove(self._journal_synced)
        for sender in self.senders:
            sender.stop()
        waits = [s.flush() for s in self.senders]
        pool = getattr(self.post, "pool", None)
        if pool is not None:
            waits.append(pool.closeCachedConnections())
        return defer.DeferredList(waits, consumeErrors=True)

    def _journal_synced(self, _: int) -> None:
        for sender in self.senders:
            sender.wake()
        if self.senders:
            self.journal.prune(min(s.cursor.seq for s in self.senders))

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.senders]


def status_from_disk(state_dir: str, hooks: tuple[Any, ...]) -> list[dict[str, Any]]:
    """The same status for a stopped MTA, from the journal and the cursors on disk."""
    base = os.path.join(state_dir, "events")
    journal = EventJournal(os.path.join(base, "journal"), clock=None)
    out = []
    for hook in hooks:
        cursor = Cursor(os.path.join(base, "webhooks", f"{hook.name}.json"))
        out.append({"name": hook.name, "url": hook.url, "backlog": max(0, journal.last_seq - cursor.seq),
                    "cursor": cursor.seq, "delivered": cursor.delivered, "dropped": cursor.dropped,
                    "failures": None, "last_error": None, "next_attempt": None})  # fmt: skip
    return out

