"""The queue manager (qmgr): moves work from the store to the delivery agents and back.

incoming -> active -> (done | deferred -> active ...); per-recipient state in the envelope;
jittered exponential retries on a timer heap; bounces (DSNs) for failures and expiry, delay
warnings, success notices as NOTIFY asks; a concurrency cap on messages in flight.
Restart-safe: at start the store recovers and the schedule is rebuilt from the envelope files.

Time: retries and expiry run on ``clock``, a monotonic clock, so a step of the wall clock neither
freezes the queue nor makes every message look a day older (a burst of delay notices or
expiries). ``wall`` gives the times written down: arrival, ``next_attempt`` (so that a restart can
compute the remaining delay), headers and ``Will-Retry-Until``. A message's age is taken from its
wall-clock arrival once, when this process first sees it, and counted on the monotonic clock after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pymta.admin.accounting import pending_received
from pymta.envelope import (
    DEFERRED as R_DEFERRED,
)
from pymta.envelope import (
    DELIVERED,
    EXPIRED,
    FAILED,
    RELAYED,
    ROUTE_LOCAL,
    ROUTE_RELAY,
    DeliveryResult,
    Envelope,
    Recipient,
    new_qid,
)
from pymta.interfaces import ACTIVE, DEFERRED, HOLD, INCOMING, IDeliveryAgent, IQueueStore, IScheduler
from pymta.queue.bounce import build_dsn, notify_allows
from pymta.queue.scheduler import TimerHeapScheduler, retry_delay
from pymta.wordings import MAX_TEXT, wordings

log = Logger(namespace="pymta.queue")

MAX_HOLD = 86400.0  # the longest a destination's delivery window holds mail back (one day)

_EVENT_FOR_STATE = {DELIVERED: "delivered", FAILED: "bounced", R_DEFERRED: "deferred", RELAYED: "relayed"}


class QueueManager(service.Service):
    """Drives delivery of everything in the store."""

    def __init__(
        self,
        store: IQueueStore,
        agents: dict[str, IDeliveryAgent],
        clock: Any,
        hostname: str,
        retry_initial: float = 300.0,
        retry_max: float = 4 * 3600.0,
        max_age: float = 5 * 86400.0,
        delay_warning: float = 4 * 3600.0,
        max_active: int = 200,
        accounting: Any = None,
        route_for: Callable[[str], str] | None = None,
        rng: random.Random | None = None,
        greylist_retry: float = 300.0,
        shutdown_grace: float = 30.0,
        abort: Callable[[], Any] | None = None,
        wall: Any = None,
        sign: Callable[[bytes], Any] | None = None,
        scheduler: IScheduler | None = None,
    ) -> None:
        self.store = store
        self.agents = agents
        self.clock = clock  # monotonic: when attempts are due, how old a message is
        self.wall = wall if wall is not None else clock  # wall time: what is written down and shown
        self.hostname = hostname
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_age = max_age
        self.delay_warning = delay_warning
        self.max_active = max_active
        self.accounting = accounting
        self.route_for = route_for or (lambda address: ROUTE_RELAY)
        self.rng = rng or random.Random()
        self.greylist_retry = greylist_retry
        self.shutdown_grace = shutdown_grace  # how long a stop waits for deliveries in flight
        self.abort = abort  # then aborts them with this (their results come back as deferred)
        self.sign = sign  # DKIM for our own notices (bytes -> Deferred of the signed bytes)
        # *When* messages are due is the scheduler's business (given; a timer heap on ``clock`` if not).
        self.scheduler: IScheduler = scheduler if scheduler is not None else TimerHeapScheduler(clock)
        self.scheduler.on_due = self._due
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()  # in _ready
        self._inflight: dict[str, defer.Deferred[Any]] = {}
        self._after: dict[str, str] = {}  # qid -> "hold" | "delete" once its attempt ends
        self._bounce_after: dict[str, list[tuple[Callable[[Envelope, Recipient], bool], str]]] = {}  # admin bounces
        self._missing_agent_logged: set[str] = set()
        self._born: dict[str, float] = {}  # qid -> arrival on the monotonic clock
        self.recovering: defer.Deferred[Any] | None = None  # fires with the recovery counts once the queue is read
        # Operator flushes made while the queue is still being read, for the messages not read yet.
        self._flush_unread: set[str] = set()
        self._flush_all_unread = False

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        """Recover the queue without holding the reactor: messages are scheduled batch by batch as
        the store reads them (incoming first), while the listeners already answer."""
        super().startService()  # type: ignore[no-untyped-call]  # twisted's Service is untyped
        self.recovering = self.store.recover_incrementally(self._recovered)
        self.recovering.addCallback(self._recovery_done)
        self.recovering.addErrback(lambda f: log.failure("queue recovery failed", f, event="recover_failed"))

    def _recovered(self, batch: list[tuple[str, str, float, float]]) -> None:
        """One batch of recovered messages: incoming ones are ready, deferred ones scheduled for
        the delay that remained when the MTA stopped, clamped (a time in the past is due now, one
        absurdly far ahead, from a clock that was wrong, after the longest regular wait). A message
        this process already knows (announced, scheduled or in flight meanwhile) is left as it is."""
        if not self.running:
            return
        wall_now, now = self.wall.seconds(), self.clock.seconds()
        longest = max(self.retry_max, MAX_HOLD)
        for qid, state, due, arrival in batch:
            if qid in self._inflight or qid in self._queued or qid in self.scheduler:
                continue
            if state == INCOMING:
                self._enqueue_ready(qid)
            elif state == DEFERRED:
                self._first_seen(qid, arrival)
                if self._flush_all_unread or qid in self._flush_unread:  # flushed before it was read
                    self._flush_unread.discard(qid)
                    self.scheduler.schedule(qid, now)
                else:
                    self.scheduler.schedule(qid, now + min(max(due - wall_now, 0.0), longest))
        self._pump()

    def _recovery_done(self, counts: dict[str, int]) -> dict[str, int]:
        self._flush_unread.clear()
        self._flush_all_unread = False
        log.info("queue recovered: {counts}", counts=counts, event="recover")
        return counts

    @property
    def _reading_queue(self) -> bool:
        return self.recovering is not None and not self.recovering.called

    def stopService(self) -> defer.Deferred[Any]:
        """Start nothing new; let attempts in flight finish within ``shutdown_grace``, then abort
        them. Fires once every attempt has written its outcome (queue state, accounting)."""
        super().stopService()  # type: ignore[no-untyped-call]  # twisted's Service is untyped
        self.scheduler.stop()
        self._ready.clear()
        self._queued.clear()
        waiting = list(self._inflight.values())
        if not waiting:
            return defer.succeed(None)
        log.info("waiting up to {grace}s for {n} delivery attempt(s) in flight", grace=self.shutdown_grace,
                 n=len(waiting), event="shutdown")  # fmt: skip
        done = defer.DeferredList(waiting, consumeErrors=True)
        timer = self.clock.callLater(self.shutdown_grace, self._abort_inflight)
        done.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return done

    def _abort_inflight(self) -> None:
        log.warn("shutdown grace of {grace}s over: aborting {n} delivery attempt(s)", grace=self.shutdown_grace,
                 n=len(self._inflight), event="shutdown")  # fmt: skip
        if self.abort is not None:
            self.abort()

    # -- intake -----------------------------------------------------------------------------

    def notify_incoming(self, qid: str) -> None:
        """New mail in INCOMING: deliver it now, without waiting for any scan.

        The same message may be announced twice (by the process that queued or released it and
        by the watcher of incoming/); an announcement that comes after the message has already
        left INCOMING (delivered, deferred, held, deleted) starts no second attempt."""
        if qid not in self._inflight and self.store.state(qid) != INCOMING:
            return
        self._enqueue_ready(qid)
        self._pump()

    def _due(self, qid: str) -> None:
        self._enqueue_ready(qid)
        self._pump()

    def _enqueue_ready(self, qid: str) -> None:
        if qid not in self._queued and qid not in self._inflight:
            self._queued.add(qid)
            self._ready.append(qid)

    def _pump(self) -> None:
        while self._ready and len(self._inflight) < self.max_active and self.running:
            qid = self._ready.popleft()
            self._queued.discard(qid)
            if qid in self._inflight:
                continue
            d = self._attempt(qid)
            self._inflight[qid] = d
            # Deferred's overloads cannot take a callback whose extra parameter has a default
            d.addErrback(lambda f, q=qid: log.failure("delivery attempt of {qid} failed", f, qid=q))  # type: ignore[call-overload]
            d.addBoth(self._finished, qid)

    def _finished(self, _: Any, qid: str) -> None:
        self._inflight.pop(qid, None)
        for matches, reason in self._bounce_after.pop(qid, []):  # asked for while it was being delivered
            self.bounce(qid, matches, reason)
        action = self._after.pop(qid, None)
        if action is not None:  # asked for during an attempt that ended without concluding
            d = self.delete(qid) if action == "delete" else self.hold(qid)
            d.addErrback(lambda f: log.failure("{action} of {qid} after its attempt failed", f, action=action, qid=qid))
        self._pump()

    # -- one attempt ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, qid: str) -> Generator[defer.Deferred[Any], Any, None]:
        if self.store.state(qid) not in (INCOMING, DEFERRED):
            return  # held, deleted or already moved
        yield self.store.move(qid, ACTIVE)
        try:
            envelope, body = self.store.load_message(qid)
        except (KeyError, ValueError) as e:
            log.error("cannot read {qid}: {why}", qid=qid, why=str(e))
            return
        self._age(envelope)  # first seen: its age starts counting on the monotonic clock
        received = self._received(envelope)
        now = self.wall.seconds()
        if envelope.not_before > now:
            yield self._durable(received)
            yield self._reschedule(envelope, envelope.not_before - now)
            return
        pending = envelope.pending_recipients()
        groups: dict[tuple[str, str, str | None], list[Recipient]] = {}
        for r in pending:
            groups.setdefault((r.route, r.domain, r.sender), []).append(r)
        # A recipient with its own sender (SRS for forwarded mail) travels in a copy of the envelope with that sender.
        calls = [
            self._deliver_group(envelope if sender is None else dataclasses.replace(envelope, sender=sender), route, rcpts, body)
            for (route, _, sender), rcpts in groups.items()
        ]
        outcomes = yield defer.DeferredList(calls, consumeErrors=True)
        now = self.wall.seconds()
        holds: list[float] = []
        records = received  # the outcomes' records commit with (or after) them: one wait for all
        retry = None  # a destination's own (initial, maximum) retry delays
        for (_, rcpts), (ok, results) in zip(groups.items(), outcomes, strict=True):
            if not ok:
                log.failure("delivery agent failed for {qid}", results, qid=qid)
                results = [DeliveryResult(r.address, R_DEFERRED, 451, "4.3.0", "Local error in delivery") for r in rcpts]
            holds.extend(r.extra.get("hold_until") or 0.0 for r in results)
            retry = next((r.extra["retry"] for r in results if r.extra.get("retry")), retry)
            records.extend(self._apply(envelope, rcpts, results, now))
        yield self._durable(records)  # the records are on disk before the queue state they report
        # Held back only by traffic shaping: no attempt is used up; try again when the limit allows.
        held_until = min(holds) if holds and all(holds) else None
        if held_until is None:
            envelope.attempts += 1
        yield self._conclude(envelope, body, now, held_until, retry)

    def _deliver_group(self, envelope: Envelope, route: str, rcpts: list[Recipient], body: bytes) -> defer.Deferred[Any]:
        agent = self.agents.get(route)
        if agent is None:
            if route not in self._missing_agent_logged:
                self._missing_agent_logged.add(route)
                log.warn("no delivery agent for route {route}: mail waits in the queue", route=route)
            text = f"No delivery agent for route {route} in this process; waiting"
            return defer.succeed([DeliveryResult(r.address, R_DEFERRED, 451, "4.3.2", text) for r in rcpts])
        d = defer.maybeDeferred(agent.deliver, envelope, rcpts, body)

        def check(results: list[DeliveryResult]) -> list[DeliveryResult]:
            if len(results) != len(rcpts):
                raise ValueError(f"agent for {route} answered {len(results)} results for {len(rcpts)} recipients")
            return results

        return d.addCallback(check)

    def _apply(self, envelope: Envelope, rcpts: list[Recipient], results: list[DeliveryResult],
               now: float) -> list[defer.Deferred[Any]]:  # fmt: skip
        """Per-recipient outcomes into the envelope; the accounting records' Deferreds."""
        records = []
        for rcpt, result in zip(rcpts, results, strict=True):
            if not result.extra.get("hold_until"):
                rcpt.attempts += 1
            rcpt.updated = now
            rcpt.reply = result.reply_dict()
            # The TLS decision of the attempt (policy source, what failed), for `pymta-queue show`.
            rcpt.reply.update({k: result.extra[k] for k in ("tls_policy", "tls_failure") if result.extra.get(k)})
            rcpt.remote_mta = result.remote_mta
            rcpt.state = result.status if result.status in (DELIVERED, FAILED, RELAYED) else R_DEFERRED
            records.append(self._account(_EVENT_FOR_STATE[rcpt.state], envelope, rcpt, now, result))
        return records

    def _received(self, envelope: Envelope) -> list[defer.Deferred[Any]]:
        """The received records left to us (pending_received), without a commit of their own: the
        next rewrite of the file waits for them."""
        return pending_received(self.accounting, envelope, prompt=False)

    @staticmethod
    def _durable(records: list[defer.Deferred[Any]]) -> defer.Deferred[Any]:
        """Fires when every record is on disk; a record that could not be written was logged in full
        by the accounting log and does not stop the queue (the delivery has happened)."""
        return defer.DeferredList(records, consumeErrors=True) if records else defer.succeed(None)

    def _account(self, event: str, envelope: Envelope, rcpt: Recipient, now: float,
                 result: Any = None) -> defer.Deferred[Any]:  # fmt: skip
        # What the message travelled with (injection campaign/tenant, pool and source): in the log
        # event (metrics read it) and in the accounting record.
        tags = {k: envelope.extra[k] for k in ("campaign", "tenant", "pool", "source") if envelope.extra.get(k)}
        queue_time = round(self._age(envelope), 3)
        extra = dict(result.extra) if result is not None else {}
        log.info(
            "{event} {qid} to {rcpt}: {code} {enhanced} {text}",
            event=event, qid=envelope.qid, rcpt=rcpt.address, sender=envelope.sender,
            code=(rcpt.reply or {}).get("code"), enhanced=(rcpt.reply or {}).get("enhanced"),
            text=(rcpt.reply or {}).get("text"), mx=rcpt.remote_mta, attempt=rcpt.attempts,
            queue_time=queue_time, tls=getattr(result, "tls", None), tls_policy=extra.get("tls_policy"),
            tls_failure=extra.get("tls_failure"), **tags,
        )  # fmt: skip
        if self.accounting is None:
            return defer.succeed(None)
        return cast("defer.Deferred[Any]", self.accounting.record(
            event,
            qid=envelope.qid,
            sender=envelope.sender,
            recipient=rcpt.address,
            route=rcpt.route,
            mx=rcpt.remote_mta,
            reply=rcpt.reply,
            tls=getattr(result, "tls", None),
            attempt=rcpt.attempts,
            queue_time=queue_time,
            metadata=envelope.extra.get("metadata"),
            **tags,
            **{k: v for k, v in extra.items() if k in ("ip", "host", "tls_version", "cipher", "tls_policy", "tls_failure", "provider")},
        ))

    @defer.inlineCallbacks
    def _conclude(self, envelope: Envelope, body: bytes, now: float, held_until: float | None = None,
                  retry: list[float] | None = None) -> Generator[defer.Deferred[Any], Any, None]:  # fmt: skip
        qid = envelope.qid
        pending = envelope.pending_recipients()
        if pending and self._age(envelope) >= self.max_age:
            records = []
            for r in pending:
                r.state = EXPIRED
                r.updated = now
                last = r.reply or {}
                r.reply = {"code": 451, "enhanced": "4.4.7",
                           "text": f"Message expired after {int(self.max_age)}s in the queue; last: {last.get('text', 'no answer')}"}  # fmt: skip
                if last.get("enhanced") == "4.7.30":  # RFC 8689 §5: no hop could take it with REQUIRETLS
                    r.reply.update(code=550, enhanced="5.7.30")
                records.append(self._account("expired", envelope, r, now))
            yield self._durable(records)
            pending = []
        yield self._notices(envelope, body, now, bool(pending))
        action = self._after.pop(qid, None)
        if action == "delete" or not pending:
            self._born.pop(qid, None)
            # Every outcome is in the accounting log (fsynced above): a removal lost in a crash
            # brings the message back for a second delivery, never loses it, so no directory fsync.
            yield self.store.remove(qid, durable=action == "delete")
            return
        if action == "hold":
            yield self.store.update(envelope)
            yield self.store.move(qid, HOLD)
            return
        if held_until is not None:  # a wall-clock time (a shaping pause, a delivery window)
            yield self._reschedule(envelope, held_until - now)
            return
        initial, maximum = retry if retry else (self.retry_initial, self.retry_max)
        delay = retry_delay(envelope.attempts, initial, maximum, self.rng)
        if all(is_greylisting(r.reply) for r in pending):
            # Greylisting wants a prompt, correct retry, not the long backoff.
            delay = min(self.greylist_retry, self.retry_initial)
        if any(r.route not in self.agents for r in pending):
            delay = self.retry_max
        yield self._reschedule(envelope, delay)

    def _age(self, envelope: Envelope) -> float:
        """Seconds ``envelope`` has been queued, on the monotonic clock (see :meth:`_first_seen`)."""
        return cast(float, self.clock.seconds() - self._first_seen(envelope.qid, envelope.arrival))

    def _first_seen(self, qid: str, arrival: float) -> float:
        """When ``qid`` arrived, on the monotonic clock: taken when this process first sees it from
        its wall-clock age, clamped to [0, max_age] (a wall clock set back, or far ahead)."""
        born = self._born.get(qid)
        if born is None:
            age = min(max(self.wall.seconds() - arrival, 0.0), self.max_age)
            born = self._born[qid] = self.clock.seconds() - age
        return born

    @defer.inlineCallbacks
    def _reschedule(self, envelope: Envelope, delay: float) -> Generator[defer.Deferred[Any], Any, None]:
        """Next attempt in ``delay`` seconds: written down as wall time, scheduled on the monotonic clock."""
        delay = max(delay, 0.0)
        when = self.clock.seconds() + delay
        envelope.next_attempt = self.wall.seconds() + delay
        yield self.store.update(envelope)
        yield self.store.move(envelope.qid, DEFERRED)
        if self._after.get(envelope.qid) == "hold":
            del self._after[envelope.qid]
            yield self.store.move(envelope.qid, HOLD)
            return
        self.scheduler.schedule(envelope.qid, when)

    # -- notices (DSNs) ---------------------------------------------------------------------

    def _notices(self, envelope: Envelope, body: bytes, now: float, still_pending: bool) -> defer.Deferred[Any]:
        """Marks the recipients whose outcome is final as notified and sends the notices their
        NOTIFY asks for. Most attempts owe none: then no generator and no Deferred chain at all."""
        if not envelope.sender:
            for r in envelope.recipients:
                r.dsn_sent = r.dsn_sent or r.is_final  # nothing is ever sent about a bounce
            return defer.succeed(None)
        failed = [r for r in envelope.recipients if r.state in (FAILED, EXPIRED) and not r.dsn_sent]
        success = [r for r in envelope.recipients if r.state in (DELIVERED, RELAYED) and not r.dsn_sent]
        for r in failed + success:
            r.dsn_sent = True
        due: list[tuple[list[Recipient], str, float | None]] = [(failed, "failed", None)]
        due.extend(([r for r in success if r.state == state], action, None)
                   for state, action in ((DELIVERED, "delivered"), (RELAYED, "relayed")))  # fmt: skip
        age = self._age(envelope)
        if still_pending and not envelope.delay_warned and age >= self.delay_warning > 0:
            envelope.delay_warned = True
            due.append((envelope.pending_recipients(), "delayed", now + self.max_age - age))
        due = [([r for r in rcpts if notify_allows(r, action)], action, until) for rcpts, action, until in due]
        due = [item for item in due if item[0]]
        return self._send_dsns(envelope, due, body, now) if due else defer.succeed(None)

    @defer.inlineCallbacks
    def _send_dsns(self, envelope: Envelope, due: list[tuple[list[Recipient], str, float | None]], body: bytes,
                   now: float) -> Generator[defer.Deferred[Any], Any, None]:  # fmt: skip
        for rcpts, action, retry_until in due:
            yield self._send_dsn(envelope, rcpts, action, body, now, retry_until)

    @defer.inlineCallbacks
    def _send_dsn(self, envelope: Envelope, rcpts: list[Recipient], action: str, body: bytes, now: float,
                  retry_until: float | None = None) -> Generator[defer.Deferred[Any], Any, None]:  # fmt: skip
        if not rcpts:
            return
        message = build_dsn(envelope, rcpts, action, body, self.hostname, now, retry_until)
        if message is None:
            return
        if self.sign is not None:
            message = yield self.sign(message)
        dsn = Envelope(
            qid=new_qid(now),
            sender="",
            recipients=[Recipient(envelope.sender, route=self.route_for(envelope.sender))],
            arrival=now,
            size=len(message),
            body_type="8BITMIME" if any(b > 127 for b in message) else "7BIT",
            protocol="LOCAL",
            # RFC 8689 §5: a notice about a REQUIRETLS message travels under REQUIRETLS too.
            extra={"dsn_for": envelope.qid, "action": action, **({"requiretls": True} if envelope.extra.get("requiretls") else {})},
        )
        try:
            yield self.store.enqueue(dsn, message)
        except Exception:
            log.failure("could not queue the {action} notice for {qid}", action=action, qid=envelope.qid)
            for r in rcpts:
                r.dsn_sent = False if action == "failed" else r.dsn_sent
            return
        log.info("{action} notice {dsn} for {qid} to <{sender}>", action=action, dsn=dsn.qid, qid=envelope.qid,
                 sender=envelope.sender, event="dsn")  # fmt: skip
        self.notify_incoming(dsn.qid)

    # -- operator actions -------------------------------------------------------------------

    def flush(self, qids: list[str] | None = None) -> list[str]:
        """Everything deferred (or the deferred messages among ``qids``) is due now; the ids made due.

        While the queue is still being read at start, a deferred message not read yet is made due
        when it is read (a suspension lifted meanwhile must not leave it waiting out the old hold)."""
        reading = self._reading_queue
        if qids is None:
            due = [qid for qid in self.store.list(DEFERRED) if qid in self.scheduler or reading]
            self.scheduler.due_now()
            self._flush_all_unread = self._flush_all_unread or reading
            return due
        now = self.clock.seconds()
        due = []
        for qid in qids:
            if qid in self.scheduler:
                self.scheduler.schedule(qid, now)
                due.append(qid)
            elif reading and qid not in self._inflight and qid not in self._queued:
                self._flush_unread.add(qid)
                due.append(qid)
        return due

    def bounce(self, qid: str, matches: Callable[[Envelope, Recipient], bool], reason: str) -> defer.Deferred[Any]:
        """KumoMTA's admin bounce: the pending recipients of ``qid`` that ``matches`` fail now as an
        administrative failure (5.0.0), with their ``bounced`` records and a DSN to the sender. Fires
        with the number of recipients failed, or None when the message is being delivered (its
        matching recipients fail when the attempt ends)."""
        if qid in self._inflight:
            self._bounce_after.setdefault(qid, []).append((matches, reason))
            return defer.succeed(None)
        busy: defer.Deferred[Any] = defer.Deferred()
        self._inflight[qid] = busy  # no delivery attempt starts while the envelope is rewritten

        def done(result: Any) -> Any:
            self._finished(None, qid)
            busy.callback(None)
            return result

        return self._bounce_now(qid, matches, reason).addBoth(done)

    @defer.inlineCallbacks
    def _bounce_now(
        self, qid: str, matches: Callable[[Envelope, Recipient], bool], reason: str
    ) -> Generator[defer.Deferred[Any], Any, int]:
        state = self.store.state(qid)
        if state not in (INCOMING, DEFERRED, HOLD):
            return 0
        envelope = self.store.load(qid)
        failing = [r for r in envelope.pending_recipients() if matches(envelope, r)]
        if not failing:
            return 0
        body = self.store.read_body(qid)
        now = self.wall.seconds()
        records = self._received(envelope)
        for r in failing:
            r.state, r.updated = FAILED, now
            r.reply = {"code": 550, "enhanced": "5.0.0", "text": f"administratively bounced: {reason}"}
            records.append(self._account("bounced", envelope, r, now))
        yield self._durable(records)
        yield self._notices(envelope, body, now, bool(envelope.pending_recipients()))
        if not envelope.pending_recipients():
            self.scheduler.cancel(qid)
            self._born.pop(qid, None)
            yield self.store.remove(qid)
        else:
            yield self.store.update(envelope)
            if state == INCOMING:  # its place in the ready queue was given up while it was rewritten
                self._enqueue_ready(qid)
        return len(failing)

    def in_flight(self, qid: str) -> bool:
        """A delivery attempt of ``qid`` is running now."""
        return qid in self._inflight

    @defer.inlineCallbacks
    def delete(self, qid: str) -> Generator[defer.Deferred[Any], Any, None]:
        if qid in self._inflight:
            self._after[qid] = "delete"
            return
        self.scheduler.cancel(qid)
        self._born.pop(qid, None)
        if self.store.state(qid) in (INCOMING, HOLD):  # maybe never attempted: its received records first
            with contextlib.suppress(KeyError, ValueError):  # gone meanwhile, or unreadable (quarantined by the load)
                yield self._durable(self._received(self.store.load(qid)))
        yield self.store.remove(qid)

    @defer.inlineCallbacks
    def hold(self, qid: str) -> Generator[defer.Deferred[Any], Any, None]:
        if qid in self._inflight:  # held when its attempt ends (a delete asked for first still wins)
            self._after.setdefault(qid, "hold")
            return
        self.scheduler.cancel(qid)
        if self.store.state(qid) not in (HOLD, None):
            yield self.store.move(qid, HOLD)

    @defer.inlineCallbacks
    def release(self, qid: str) -> Generator[defer.Deferred[Any], Any, None]:
        if self._after.get(qid) == "hold":  # held while active: not held after all
            del self._after[qid]
            return
        if self.store.state(qid) != HOLD:
            return
        yield self.store.move(qid, INCOMING)
        self.notify_incoming(qid)


def is_greylisting(reply: dict[str, Any] | None) -> bool:
    """A 45x reply that asks for a retry soon (greylisting), by code and wording."""
    if not reply or not 450 <= int(reply.get("code") or 0) <= 451:
        return False
    return bool(wordings().greylisting.search(str(reply.get("text") or "")[:MAX_TEXT]))


def local_route_for(local_domains: Any) -> Callable[[str], str]:
    """Where a notice to ``address`` goes: local Maildir for local domains, else the relay."""
    domains = frozenset(d.lower() for d in local_domains)

    def route_for(address: str) -> str:
        return ROUTE_LOCAL if address.rpartition("@")[2].lower() in domains else ROUTE_RELAY

    return route_for
