"""Behaviour every IQueueStore must show: a mixin over a ``make_store()`` hook.

Mix it into a ``twisted.trial.unittest.TestCase`` whose ``make_store()`` returns a fresh,
empty, recovered store. Tests return Deferreds, so real-thread stores work too.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface.verify import verifyObject

from pymta.envelope import Envelope, Recipient, new_qid
from pymta.interfaces import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    QUEUE_STATES,
    IQueueStore,
    QueueError,
)

BODY = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def make_envelope(qid: str | None = None, now: float | None = None, **kw) -> Envelope:
    rcpts = kw.pop("recipients", None) or [Recipient("b@example.net"), Recipient("c@example.com")]
    return Envelope(qid=new_qid(now) if qid is None else qid, sender="a@example.org", recipients=rcpts, size=len(BODY), **kw)


class QueueStoreContract:
    """The IQueueStore contract."""

    def make_store(self):
        raise NotImplementedError

    def test_store_provides_the_interface(self):
        self.assertTrue(verifyObject(IQueueStore, self.make_store()))

    @defer.inlineCallbacks
    def test_enqueued_message_is_incoming_with_envelope_and_body(self):
        store = self.make_store()
        env = make_envelope(envid="E1")
        qid = yield store.enqueue(env, BODY)
        self.assertEqual(qid, env.qid)
        self.assertEqual(store.state(qid), INCOMING)
        self.assertEqual(store.list(INCOMING), [qid])
        self.assertEqual(store.load(qid), env)
        self.assertEqual(store.read_body(qid), BODY)

    @defer.inlineCallbacks
    def test_load_message_gives_the_envelope_and_the_body_together(self):
        store = self.make_store()
        small, large = make_envelope(), make_envelope()
        large_body = b"y" * 300_000 + b"\r\n"  # over any one-read size a store may have
        yield store.enqueue(small, BODY)
        yield store.enqueue(large, large_body)
        large.attempts = 3  # an updated envelope: the newest record counts
        yield store.update(large)
        self.assertEqual(store.load_message(small.qid), (small, BODY))
        self.assertEqual(store.load_message(large.qid), (large, large_body))
        with self.assertRaises(KeyError):
            store.load_message("NOSUCHQUEUEID0000000")

    @defer.inlineCallbacks
    def test_a_quarantined_message_is_queued_straight_into_hold(self):
        store = self.make_store()
        env = make_envelope()
        qid = yield store.enqueue(env, BODY, HOLD)
        self.assertEqual(store.state(qid), HOLD)
        self.assertEqual(store.list(INCOMING), [])
        self.assertEqual(store.read_body(qid), BODY)
        with self.assertRaises(ValueError):
            yield store.enqueue(make_envelope(), BODY, ACTIVE)

    @defer.inlineCallbacks
    def test_stored_envelope_does_not_follow_later_changes_of_the_caller_object(self):
        store = self.make_store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        env.recipients[0].state = "delivered"
        env.attempts = 7
        loaded = store.load(env.qid)
        self.assertEqual(loaded.attempts, 0)
        self.assertEqual(loaded.recipients[0].state, "pending")
        loaded.attempts = 3
        self.assertEqual(store.load(env.qid).attempts, 0)

    @defer.inlineCallbacks
    def test_list_is_oldest_first_whatever_the_enqueue_order(self):
        store = self.make_store()
        envs = [make_envelope(now=1_700_000_000 + i) for i in range(5)]
        for i in (3, 0, 4, 1, 2):
            yield store.enqueue(envs[i], BODY)
        self.assertEqual(store.list(INCOMING), [e.qid for e in envs])

    @defer.inlineCallbacks
    def test_duplicate_qid_is_refused_and_the_first_message_kept(self):
        store = self.make_store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        other = make_envelope(qid=env.qid, envid="other")
        yield self.assertFailure(store.enqueue(other, b"other body\r\n"), QueueError)
        self.assertEqual(store.load(env.qid), env)
        self.assertEqual(store.read_body(env.qid), BODY)
        self.assertEqual(store.list(INCOMING), [env.qid])

    @defer.inlineCallbacks
    def test_enqueue_many_queues_each_and_answers_for_each_in_order(self):
        store = self.make_store()
        first = make_envelope()
        yield store.enqueue(first, BODY)
        envs = [make_envelope(envid=f"E{i}") for i in range(4)]
        items = [(envs[0], BODY), (make_envelope(qid="../x"), BODY), (envs[1], b""),
                 (make_envelope(qid=first.qid), b"again\r\n"), (envs[2], BODY * 3), (envs[3], b"\x00\xff")]  # fmt: skip
        out = yield store.enqueue_many(items)
        self.assertEqual([out[0], out[2], out[4], out[5]], [e.qid for e in envs])
        self.assertIsInstance(out[1], ValueError)
        self.assertIsInstance(out[3], QueueError)
        self.assertEqual(store.list(INCOMING), sorted([first.qid, *(e.qid for e in envs)]))
        for env, body in ((envs[0], BODY), (envs[1], b""), (envs[2], BODY * 3), (envs[3], b"\x00\xff")):
            self.assertEqual(store.load(env.qid), env)
            self.assertEqual(store.read_body(env.qid), body)
        self.assertEqual(store.read_body(first.qid), BODY)  # the duplicate changed nothing
        self.assertEqual((yield store.enqueue_many([])), [])
        held = make_envelope()
        self.assertEqual((yield store.enqueue_many([(held, BODY)], HOLD)), [held.qid])
        self.assertEqual(store.state(held.qid), HOLD)
        yield self.assertFailure(store.enqueue_many([(make_envelope(), BODY)], ACTIVE), ValueError)

    @defer.inlineCallbacks
    def test_qid_that_is_not_a_safe_file_name_is_refused(self):
        store = self.make_store()
        for bad in ("../x", "", ".hidden", "a/b", "a\x00b"):
            yield self.assertFailure(store.enqueue(make_envelope(qid=bad), BODY), ValueError)
        for state in QUEUE_STATES:
            self.assertEqual(store.list(state), [])

    @defer.inlineCallbacks
    def test_update_rewrites_envelope_and_keeps_state_and_body(self):
        store = self.make_store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, DEFERRED)
        env.attempts = 2
        env.recipients[1].state = "delivered"
        env.recipients[1].reply = {"code": 250, "enhanced": "2.0.0", "text": "ok"}
        yield store.update(env)
        self.assertEqual(store.load(env.qid), env)
        self.assertEqual(store.state(env.qid), DEFERRED)
        self.assertEqual(store.read_body(env.qid), BODY)

    @defer.inlineCallbacks
    def test_update_of_unknown_message_fails_with_key_error(self):
        store = self.make_store()
        yield self.assertFailure(store.update(make_envelope()), KeyError)
        for state in QUEUE_STATES:
            self.assertEqual(store.list(state), [])

    @defer.inlineCallbacks
    def test_move_walks_the_message_through_the_states(self):
        store = self.make_store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        for state in (ACTIVE, DEFERRED, HOLD, CORRUPT, INCOMING):
            yield store.move(env.qid, state)
            self.assertEqual(store.state(env.qid), state)
            self.assertEqual([s for s in QUEUE_STATES if store.list(s)], [state])
            self.assertEqual(store.load(env.qid), env)
            self.assertEqual(store.read_body(env.qid), BODY)

    @defer.inlineCallbacks
    def test_move_to_the_current_state_changes_nothing(self):
        store = self.make_store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, INCOMING)
        self.assertEqual(store.list(INCOMING), [env.qid])
        self.assertEqual(store.load(env.qid), env)

    @defer.inlineCallbacks
    def test_move_of_unknown_message_or_to_unknown_state_fails(self):
        store = self.make_store()
        yield self.assertFailure(store.move(new_qid(), ACTIVE), KeyError)
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield self.assertFailure(store.move(env.qid, "nowhere"), ValueError)
        self.assertEqual(store.state(env.qid), INCOMING)

    @defer.inlineCallbacks
    def test_removed_message_is_gone_everywhere(self):
        store = self.make_store()
        env, keep = make_envelope(), make_envelope()
        yield store.enqueue(env, BODY)
        yield store.enqueue(keep, BODY)
        yield store.move(env.qid, ACTIVE)
        yield store.remove(env.qid)
        self.assertIsNone(store.state(env.qid))
        self.assertRaises(KeyError, store.load, env.qid)
        self.assertRaises(KeyError, store.read_body, env.qid)
        self.assertEqual(store.list(ACTIVE), [])
        self.assertEqual(store.list(INCOMING), [keep.qid])

    @defer.inlineCallbacks
    def test_removing_an_unknown_message_is_a_no_op(self):
        store = self.make_store()
        yield store.remove(new_qid())

    def test_unknown_message_has_no_state_envelope_or_body(self):
        store = self.make_store()
        qid = new_qid()
        self.assertIsNone(store.state(qid))
        self.assertRaises(KeyError, store.load, qid)
        self.assertRaises(KeyError, store.read_body, qid)

    def test_listing_an_unknown_state_is_an_error(self):
        self.assertRaises(ValueError, self.make_store().list, "nowhere")

    @defer.inlineCallbacks
    def test_recover_puts_active_messages_back_to_incoming_and_keeps_the_rest(self):
        store = self.make_store()
        envs = [make_envelope(now=1_700_000_000 + i) for i in range(4)]
        for env in envs:
            yield store.enqueue(env, BODY)
        yield store.move(envs[0].qid, ACTIVE)
        yield store.move(envs[2].qid, ACTIVE)
        yield store.move(envs[1].qid, DEFERRED)
        yield store.move(envs[3].qid, HOLD)
        counts = store.recover()
        self.assertEqual(counts["requeued"], 2)
        self.assertEqual(counts["queued"], 4)
        self.assertEqual(counts["corrupt"], 0)
        self.assertEqual(store.list(INCOMING), [envs[0].qid, envs[2].qid])
        self.assertEqual(store.list(ACTIVE), [])
        self.assertEqual(store.list(DEFERRED), [envs[1].qid])
        self.assertEqual(store.list(HOLD), [envs[3].qid])
        self.assertEqual(store.load(envs[2].qid), envs[2])

    @defer.inlineCallbacks
    def test_recover_does_not_count_quarantined_messages_as_queued(self):
        store = self.make_store()
        envs = [make_envelope(now=1_700_000_000 + i) for i in range(3)]
        for env in envs:
            yield store.enqueue(env, BODY)
        yield store.move(envs[1].qid, CORRUPT)
        counts = store.recover()
        self.assertEqual((counts["queued"], counts["quarantined"], counts["in_corrupt"]), (2, 0, 1))

    @defer.inlineCallbacks
    def test_empty_body_and_binary_body_are_stored_exactly(self):
        store = self.make_store()
        bodies = [b"", bytes(range(256)) * 64]
        envs = [make_envelope() for _ in bodies]
        for env, body in zip(envs, bodies, strict=True):
            yield store.enqueue(env, body)
        for env, body in zip(envs, bodies, strict=True):
            self.assertEqual(store.read_body(env.qid), body)
