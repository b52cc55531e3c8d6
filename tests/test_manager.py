"""The queue manager on task.Clock with the in-memory store and a scripted agent."""

from __future__ import annotations

import email
import random

import pytest
from twisted.internet import task

from pymta.envelope import DELIVERED, ROUTE_LOCAL, ROUTE_RELAY, DeliveryResult, Envelope, Recipient, new_qid
from pymta.interfaces import DEFERRED, HOLD, INCOMING
from pymta.queue.manager import QueueManager
from pymta.queue.scheduler import TimerHeapScheduler, retry_delay
from pymta.queue.store import MemoryQueueStore
from tests.fakes import OK, ScriptedDeliveryAgent, deferred, failed

BODY = b"From: a@example.org\r\nSubject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n"


class Harness:
    def __init__(self, script=None, store=None, max_active=100, hold=False, clock=None, **kw) -> None:
        self.clock = clock or task.Clock()
        if clock is None:
            self.clock.advance(1_700_000_000)
        self.store = store or MemoryQueueStore()
        self.relay = ScriptedDeliveryAgent(script, hold=hold)
        self.local = ScriptedDeliveryAgent()
        self.manager = QueueManager(
            self.store, {ROUTE_RELAY: self.relay, ROUTE_LOCAL: self.local}, self.clock, "mx.example.test",
            retry_initial=300, retry_max=3600, max_age=86400, delay_warning=7200, max_active=max_active,
            route_for=lambda a: ROUTE_LOCAL if a.endswith("@example.test") else ROUTE_RELAY,
            rng=random.Random(7), **kw,
        )  # fmt: skip
        self.manager.startService()

    def queue(self, rcpts, sender="someone@example.test", notify=None, **env) -> str:
        qid = new_qid()
        envelope = Envelope(
            qid=qid, sender=sender, arrival=self.clock.seconds(),
            recipients=[Recipient(a, route=ROUTE_RELAY, notify=notify) for a in rcpts], **env,
        )  # fmt: skip
        self.store.enqueue(envelope, BODY)
        self.manager.notify_incoming(qid)
        return qid

    def dsns(self) -> list[email.message.Message]:
        """Notices handed to the local agent (the original senders are local here)."""
        out = []
        for _qid, _, body in self.local.calls:
            out.append(email.message_from_bytes(body))
        return out


def test_delivered_message_leaves_the_queue():
    h = Harness()
    qid = h.queue(["a@remote.example", "b@remote.example"])
    assert h.relay.calls == [(qid, ["a@remote.example", "b@remote.example"], BODY)]
    assert h.store.state(qid) is None


def test_recipients_are_batched_per_route_and_domain():
    h = Harness()
    h.queue(["a@one.example", "b@two.example", "c@one.example"])
    assert sorted(c[1] for c in h.relay.calls) == [["a@one.example", "c@one.example"], ["b@two.example"]]


def test_mixed_results_defer_only_the_failed_ones_and_retry_at_the_jittered_time():
    h = Harness({"b@remote.example": [deferred(), deferred(), OK]})
    qid = h.queue(["a@remote.example", "b@remote.example"])
    assert h.store.state(qid) == DEFERRED
    env = h.store.load(qid)
    assert [r.state for r in env.recipients] == [DELIVERED, "deferred"]
    assert env.recipients[1].reply == {"code": 450, "enhanced": "4.2.0", "text": "try later"}
    first_delay = env.next_attempt - h.clock.seconds()
    assert 270 <= first_delay <= 330
    h.clock.advance(first_delay + 1)
    assert [c[1] for c in h.relay.calls][-1] == ["b@remote.example"]  # only the pending one again
    second = h.store.load(qid).next_attempt - h.clock.seconds()
    assert 540 <= second <= 660  # exponential
    h.clock.advance(second + 1)
    assert h.store.state(qid) is None  # the third attempt delivered


def test_greylisting_450_then_250_on_retry():
    h = Harness({"a@remote.example": [deferred(450, "4.7.1", "greylisted"), (DELIVERED, 250, "2.0.0", "ok")]})
    qid = h.queue(["a@remote.example"])
    assert h.store.state(qid) == DEFERRED
    h.clock.advance(400)
    assert h.store.state(qid) is None
    assert len(h.relay.calls) == 2


def test_permanent_failure_bounces_to_the_sender_with_a_dsn():
    h = Harness({"a@remote.example": [failed()]})
    qid = h.queue(["a@remote.example"], envid="ENV-9")
    assert h.store.state(qid) is None
    [dsn] = h.dsns()
    assert dsn["To"] == "<someone@example.test>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn.get_content_type() == "multipart/report"
    report = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = report.as_string()
    assert "Final-Recipient: rfc822; a@remote.example" in text
    assert "Action: failed" in text
    assert "Status: 5.1.1" in text
    assert "Original-Envelope-Id: ENV-9" in text


def test_no_bounce_for_a_bounce():
    h = Harness({"a@remote.example": [failed()]})
    qid = h.queue(["a@remote.example"], sender="")
    assert h.store.state(qid) is None
    assert h.dsns() == []


@pytest.mark.parametrize(("notify", "expected"), [(("NEVER",), 0), (("SUCCESS",), 0), (("FAILURE",), 1), (None, 1)])
def test_notify_decides_failure_notices(notify, expected):
    h = Harness({"a@remote.example": [failed()]})
    h.queue(["a@remote.example"], notify=notify)
    assert len(h.dsns()) == expected


def test_notify_success_gets_a_delivery_report():
    h = Harness()
    h.queue(["a@remote.example"], notify=("SUCCESS",))
    [dsn] = h.dsns()
    assert "Action: delivered" in dsn.as_string()


def test_expiry_bounces_with_447_and_one_delay_warning_before():
    h = Harness({"a@remote.example": [deferred(451, "4.4.1", "no answer")]})
    qid = h.queue(["a@remote.example"])
    for _ in range(60):
        if h.store.state(qid) is None:
            break
        h.clock.advance(3600)
    assert h.store.state(qid) is None
    notices = h.dsns()
    actions = [("Action: delayed" in n.as_string(), "Action: failed" in n.as_string()) for n in notices]
    assert actions == [(True, False), (False, True)]
    assert "Status: 4.4.7" in notices[1].as_string()


def test_restart_rebuilds_the_schedule_from_envelopes():
    h = Harness({"a@remote.example": [deferred()]})
    qid = h.queue(["a@remote.example"])
    h.manager.stopService()
    # A new manager over the same store (a restart), the remote now accepts.
    again = Harness(store=h.store, clock=h.clock)
    assert again.manager.scheduler.when(qid) == h.store.load(qid).next_attempt
    h.clock.advance(400)
    assert h.store.state(qid) is None
    assert again.relay.calls[0][0] == qid


def test_agent_failure_defers_every_recipient_of_the_batch():
    h = Harness({"a@remote.example": [RuntimeError("bug")]})
    qid = h.queue(["a@remote.example"])
    assert h.store.state(qid) == DEFERRED
    assert h.store.load(qid).recipients[0].reply["enhanced"] == "4.3.0"


def test_route_without_agent_waits_without_bouncing():
    h = Harness()
    qid = new_qid()
    h.store.enqueue(Envelope(qid=qid, sender="s@example.test", recipients=[Recipient("x@y.example", route="forward")],
                             arrival=h.clock.seconds()), BODY)  # fmt: skip
    h.manager.notify_incoming(qid)
    assert h.store.state(qid) == DEFERRED
    assert h.dsns() == []


def test_max_active_caps_messages_in_flight():
    h = Harness(max_active=2, hold=True)
    for _ in range(5):
        h.queue(["a@remote.example"])
    assert len(h.relay.pending) == 2
    h.relay.release_all()
    assert len(h.relay.pending) == 2
    h.relay.release_all()
    h.relay.release_all()
    assert len(h.relay.calls) == 5


def test_hold_release_delete_flush():
    h = Harness({"a@remote.example": [deferred()]})
    qid = h.queue(["a@remote.example"])
    h.manager.hold(qid)
    assert h.store.state(qid) == HOLD
    assert h.manager.scheduler.when(qid) is None
    h.clock.advance(10_000)
    assert len(h.relay.calls) == 1  # held: never scheduled
    h.manager.release(qid)
    assert len(h.relay.calls) == 2
    assert h.store.state(qid) == DEFERRED
    h.manager.flush()
    h.clock.advance(0)
    assert len(h.relay.calls) == 3
    h.manager.delete(qid)
    assert h.store.state(qid) is None


def test_not_before_waits_without_using_an_attempt():
    h = Harness()
    qid = h.queue(["a@remote.example"], not_before=1_700_000_000 + 600)
    assert h.relay.calls == []
    assert h.store.state(qid) == DEFERRED
    h.clock.advance(601)
    assert h.store.state(qid) is None


def test_stop_waits_for_deliveries_in_flight():
    h = Harness(hold=True)
    qid = h.queue(["a@remote.example"])
    stopped = h.manager.stopService()
    assert not stopped.called
    h.relay.release_all()
    assert stopped.called
    assert h.store.state(qid) is None


def test_recover_puts_interrupted_work_back_at_start():
    store = MemoryQueueStore()
    qid = new_qid()
    store.enqueue(Envelope(qid=qid, sender="s@example.test", recipients=[Recipient("a@remote.example")]), BODY)
    store.move(qid, "active")
    h = Harness(store=store)
    assert h.store.state(qid) is None
    assert h.relay.calls[0][0] == qid


# -- scheduler ----------------------------------------------------------------------------------


def test_scheduler_fires_in_time_order_with_one_timer():
    clock = task.Clock()
    fired = []
    s = TimerHeapScheduler(clock, fired.append)
    s.schedule("b", 20)
    s.schedule("a", 10)
    s.schedule("c", 30)
    s.cancel("c")
    s.schedule("b", 5)  # rescheduled earlier
    assert len(clock.getDelayedCalls()) == 1
    assert len(s) == 2
    clock.advance(5)
    assert fired == ["b"]
    clock.advance(100)
    assert fired == ["b", "a"]
    assert len(s) == 0
    assert clock.getDelayedCalls() == []


def test_retry_delay_grows_and_is_capped_with_jitter():
    rng = random.Random(1)
    delays = [retry_delay(n, 300, 3600, rng) for n in range(1, 10)]
    assert 270 <= delays[0] <= 330
    assert 540 <= delays[1] <= 660
    assert all(d <= 3600 for d in delays)
    assert delays[-1] >= 3240


def test_manager_does_nothing_before_start():
    store = MemoryQueueStore()
    manager = QueueManager(store, {}, task.Clock(), "h")
    qid = new_qid()
    store.enqueue(Envelope(qid=qid, sender="", recipients=[Recipient("a@b.example")]), BODY)
    manager.notify_incoming(qid)
    assert store.state(qid) == INCOMING
    manager.startService()
    assert store.state(qid) == DEFERRED  # started: tried, and waits (no agent for its route here)


def test_greylisting_replies_are_retried_soon_not_on_the_long_backoff():
    h = Harness({"a@remote.example": [deferred(450, "4.7.1", "Greylisted, please try again in 60 seconds")]},
                greylist_retry=60)  # fmt: skip
    qid = h.queue(["a@remote.example"])
    assert h.store.load(qid).next_attempt - h.clock.seconds() == 60
    other = Harness({"a@remote.example": [deferred(450, "4.2.0", "mailbox busy")]}, greylist_retry=60)
    qid = other.queue(["a@remote.example"])
    assert other.store.load(qid).next_attempt - other.clock.seconds() > 200


def test_our_own_notices_are_dkim_signed_before_they_are_queued():
    import dkim
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pymta.auth.accept import SenderAuth
    from pymta.auth.dkim import DkimSigner, SigningKey

    clock = task.Clock()
    clock.advance(1_700_000_000)
    signer = DkimSigner({}, "t", clock)
    key = SigningKey("example.test", "s1", "rsa-sha256", rsa.generate_private_key(65537, 2048), "-",
                     headers=("from", "to", "subject", "date", "message-id"))  # fmt: skip
    signer.keys = {"example.test": [key]}  # From: MAILER-DAEMON@mx.example.test: the parent domain's key
    auth = SenderAuth(clock, None, "mx.example.test", signer=signer)
    h = Harness({"a@remote.example": [failed()]}, clock=clock, sign=auth.sign)
    h.queue(["a@remote.example"])
    [(_, _, notice)] = h.local.calls
    assert notice.startswith(b"DKIM-Signature:")
    assert b" d=example.test;" in notice
    record = key.public_record().encode()
    assert dkim.verify(notice.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
                       dnsfunc=lambda name, timeout=5: record)  # fmt: skip


def test_a_late_second_announcement_of_a_message_that_left_incoming_starts_no_attempt():
    h = Harness({"a@remote.example": [deferred(), OK]})
    qid = h.queue(["a@remote.example"])
    assert h.store.state(qid) == DEFERRED
    assert len(h.relay.calls) == 1
    h.manager.notify_incoming(qid)  # e.g. the incoming/ watcher, after the attempt already ended
    assert len(h.relay.calls) == 1
    assert h.store.state(qid) == DEFERRED


def _domain_is(domain):
    return lambda envelope, rcpt: rcpt.domain == domain


def test_admin_bounce_fails_matching_deferred_recipients_with_a_dsn_and_keeps_the_others():
    h = Harness(script={"a@remote.example": [deferred()], "b@other.example": [deferred()]})
    qid = h.queue(["a@remote.example", "b@other.example"])
    assert h.store.state(qid) == DEFERRED
    n = []
    h.manager.bounce(qid, _domain_is("remote.example"), "list cleaned").addCallback(n.append)
    assert n == [1]
    assert not h.manager.in_flight(qid)
    envelope = h.store.load(qid)
    a, b = envelope.recipients
    assert (a.state, a.reply["enhanced"], a.reply["text"]) == ("failed", "5.0.0", "administratively bounced: list cleaned")
    assert b.state == "deferred"
    assert h.store.state(qid) == DEFERRED
    assert qid in h.manager.scheduler
    [dsn] = h.dsns()
    assert "administratively bounced: list cleaned" in dsn.as_string()
    h.manager.bounce(qid, _domain_is("other.example"), "gone")
    assert h.store.state(qid) is None
    assert qid not in h.manager.scheduler


def test_admin_bounce_of_a_message_being_delivered_applies_when_its_attempt_ends():
    h = Harness(hold=True)
    qid = h.queue(["a@remote.example"])
    assert h.manager.in_flight(qid)
    n = []
    h.manager.bounce(qid, _domain_is("remote.example"), "stop it").addCallback(n.append)
    assert n == [None]  # after the attempt
    d, results = h.relay.pending.pop()
    d.callback(results)  # the attempt delivered it: nothing is left to bounce, and the message is gone
    assert h.store.state(qid) is None
    assert h.dsns() == []
    qid = h.queue(["c@remote.example"])
    h.manager.bounce(qid, _domain_is("remote.example"), "stop it")
    d, results = h.relay.pending.pop()
    d.callback([DeliveryResult(r.address, "deferred", 451, "4.0.0", "later") for r in results])
    assert h.store.state(qid) is None
    [dsn] = h.dsns()
    assert "administratively bounced: stop it" in dsn.as_string()


class SlowlyReadStore(MemoryQueueStore):
    """The in-memory store whose start-up reading hands over its batches only when told."""

    def recover_incrementally(self, on_batch):
        from twisted.internet import defer

        self.pending: list = []
        for state in (INCOMING, DEFERRED, HOLD):
            for qid in self.list(state):
                envelope = self.load(qid)
                self.pending.append((qid, state, max(envelope.next_attempt, envelope.not_before), envelope.arrival))
        self.hand_over = lambda: on_batch([self.pending.pop(0)])
        self.done: defer.Deferred = defer.Deferred()
        return self.done


@pytest.mark.parametrize("whole_queue", [False, True])
def test_a_flush_while_the_queue_is_still_read_reaches_messages_read_after_it(whole_queue):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    store = SlowlyReadStore()
    qids = []
    for _ in range(2):
        qid = new_qid(clock.seconds())
        envelope = Envelope(qid=qid, sender="", recipients=[Recipient("a@remote.example", route=ROUTE_RELAY)],
                            arrival=clock.seconds(), next_attempt=clock.seconds() + 7200)  # fmt: skip
        store.enqueue(envelope, BODY)
        store.move(qid, DEFERRED)
        qids.append(qid)
    h = Harness(store=store, clock=clock)
    h.store.hand_over()  # the first is read: scheduled two hours ahead, as stored
    assert qids[0] in h.manager.scheduler
    made_due = h.manager.flush(None if whole_queue else qids)
    assert set(made_due) == set(qids)  # the one not read yet counts too
    h.store.hand_over()  # the second is read after the flush: due now, not in two hours
    h.store.done.callback({})
    clock.advance(1)
    assert sorted(call[0] for call in h.relay.calls) == sorted(qids)
    # Once the queue is read, a flush names only what it finds scheduled.
    assert h.manager.flush(["NOSUCHQID"]) == []
