"""The queue stores: contract tests for the maildir spool and the in-memory fake, durability of the spool."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pymta.envelope import Envelope, new_qid
from pymta.interfaces import ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, QUEUE_STATES, QueueError, QueueFull
from pymta.queue.store import MaildirQueueStore, MemoryQueueStore
from tests.contract_queue_store import BODY, QueueStoreContract, make_envelope
from tests.fs_faults import Crash, RecordingOps, fail_at, files_under, started_pool


class MemoryQueueStoreContractTests(QueueStoreContract, unittest.TestCase):
    def make_store(self):
        return MemoryQueueStore()


class MemoryQueueStoreFaultTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_injected_failure_fails_every_write_until_cleared(self):
        store = MemoryQueueStore()
        env = make_envelope()
        store.fail_with = QueueFull()
        yield self.assertFailure(store.enqueue(env, BODY), QueueFull)
        self.assertIsNone(store.state(env.qid))
        store.fail_with = None
        yield store.enqueue(env, BODY)
        store.fail_with = QueueFull()
        yield self.assertFailure(store.update(env), QueueFull)
        yield self.assertFailure(store.remove(env.qid), QueueFull)
        self.assertEqual(store.read_body(env.qid), BODY)


class MaildirQueueStoreContractTests(QueueStoreContract, unittest.TestCase):
    def make_store(self):
        store = MaildirQueueStore(self.mktemp(), reactor, started_pool(self))
        store.recover()
        return store


def _enqueue_steps(root: str, qid: str) -> list[tuple[str, str]]:
    body, env = f"tmp/{qid}.body", f"tmp/{qid}.env"
    return [
        *[(op, body) for op in ("open", "write", "fsync", "close")],
        *[(op, env) for op in ("open", "write", "fsync", "close")],
        ("rename", body),
        ("rename", env),
        ("fsync_dir", "data"),
        ("fsync_dir", "incoming"),
    ]


COMMIT_STEP = 9  # the envelope rename in _enqueue_steps


class MaildirQueueStoreDurabilityTests(unittest.TestCase):
    def setUp(self):
        self.root = self.mktemp()
        self.pool = started_pool(self)

    def store(self, ops=None):
        return MaildirQueueStore(self.root, reactor, self.pool, ops=ops)

    def assert_empty_queue(self):
        self.assertEqual(files_under(self.root), [])

    def assert_whole_message(self, store, env):
        self.assertEqual(store.load(env.qid), env)
        self.assertEqual(store.read_body(env.qid), BODY)
        self.assertEqual(files_under(self.root), [f"data/{env.qid}", f"incoming/{env.qid}"])

    def test_new_store_creates_private_directories(self):
        self.store()
        for name in ("tmp", "data", *QUEUE_STATES):
            mode = os.stat(os.path.join(self.root, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o700, name)

    @defer.inlineCallbacks
    def test_enqueue_writes_body_and_envelope_files_where_the_layout_says(self):
        env = make_envelope()
        yield self.store().enqueue(env, BODY)
        with open(os.path.join(self.root, "data", env.qid), "rb") as f:
            self.assertEqual(f.read(), BODY)
        with open(os.path.join(self.root, "incoming", env.qid), "rb") as f:
            self.assertEqual(Envelope.from_json(f.read()), env)
        self.assertEqual(files_under(self.root), [f"data/{env.qid}", f"incoming/{env.qid}"])

    @defer.inlineCallbacks
    def test_enqueue_fires_only_after_file_fsyncs_renames_and_directory_fsyncs(self):
        ops = RecordingOps(self.root)
        env = make_envelope()
        yield self.store(ops).enqueue(env, BODY).addCallback(lambda _: ops.calls.append(("fired",)))
        self.assertEqual(ops.calls, [*_enqueue_steps(self.root, env.qid), ("fired",)])

    @defer.inlineCallbacks
    def test_enqueue_failure_at_any_step_leaves_nothing_and_names_the_cause(self):
        for step in range(len(_enqueue_steps(self.root, "X"))):
            for error, expected in ((errno.ENOSPC, QueueFull), (errno.EDQUOT, QueueFull), (errno.EIO, QueueError)):
                store = self.store(RecordingOps(self.root, fail_at(step, OSError(error, os.strerror(error)))))
                env = make_envelope()
                yield self.assertFailure(store.enqueue(env, BODY), expected)
                self.assert_empty_queue()
                self.assertIsNone(store.state(env.qid))
                yield store.enqueue(make_envelope(qid=env.qid), BODY)  # the store still works
                yield store.remove(env.qid)

    @defer.inlineCallbacks
    def test_crash_at_any_enqueue_step_recovers_whole_message_or_nothing(self):
        steps = _enqueue_steps(self.root, "X")
        for step in range(len(steps)):
            env = make_envelope()
            crashing = self.store(RecordingOps(self.root, fail_at(step, Crash(step))))
            yield self.assertFailure(crashing.enqueue(env, BODY), Crash)
            store = self.store()
            counts = store.recover()
            self.assertEqual((counts["corrupt"], counts["missing_body"]), (0, 0))
            if step > COMMIT_STEP:  # renamed into incoming/: the message must survive
                self.assert_whole_message(store, env)
            elif store.state(env.qid) is None:
                self.assert_empty_queue()
            else:
                self.assert_whole_message(store, env)
            yield store.remove(env.qid)
            self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_crash_at_any_step_of_update_move_or_remove_leaves_a_consistent_message(self):
        changes = {
            "update": lambda store, env: store.update(env),
            "move": lambda store, env: store.move(env.qid, DEFERRED),
            "remove": lambda store, env: store.remove(env.qid),
        }
        for name, change in changes.items():
            for step in range(12):
                env = make_envelope()
                yield self.store().enqueue(env, BODY)
                ops = RecordingOps(self.root, fail_at(step, Crash(step)))
                changed = make_envelope(qid=env.qid, attempts=4)
                crashed = yield change(self.store(ops), changed).addCallbacks(lambda _: False, lambda f: f.trap(Crash))
                store = self.store()
                counts = store.recover()
                self.assertEqual((counts["corrupt"], counts["missing_body"]), (0, 0), (name, step))
                if store.state(env.qid) is None:
                    self.assertEqual(name, "remove")
                    self.assert_empty_queue()
                else:
                    self.assertIn(store.load(env.qid), (env, changed))
                    self.assertEqual(store.read_body(env.qid), BODY)
                    self.assertEqual(len(files_under(self.root)), 2)
                    yield store.remove(env.qid)
                if not crashed:  # every step of this change was tried
                    self.assertEqual(len(ops.calls), step)
                    break
            else:
                self.fail(f"{name} was never completed in 12 steps")

    @defer.inlineCallbacks
    def test_update_writes_a_new_envelope_file_and_renames_it_over_the_old_one(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, DEFERRED)
        ops = RecordingOps(self.root)
        env.attempts = 1
        yield self.store(ops).update(env)
        tmp = [path for op, path in ops.calls if op == "open"]
        self.assertEqual(len(tmp), 1)
        self.assertTrue(tmp[0].startswith(f"tmp/{env.qid}.env."))
        self.assertEqual(
            ops.calls,
            [*[(op, tmp[0]) for op in ("open", "write", "fsync", "close", "rename")], ("fsync_dir", "deferred")],
        )
        self.assertEqual(store.load(env.qid).attempts, 1)

    @defer.inlineCallbacks
    def test_remove_unlinks_the_envelope_before_the_body(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        ops = RecordingOps(self.root)
        yield self.store(ops).remove(env.qid)
        self.assertEqual([c for c in ops.calls if c[0] == "unlink"], [("unlink", f"incoming/{env.qid}"), ("unlink", f"data/{env.qid}")])
        self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_recover_cleans_leftovers_and_quarantines_what_it_cannot_read(self):
        store = self.store()
        good, active, no_body, garbled, wrong_qid = envs = [make_envelope(now=1_700_000_000 + i) for i in range(5)]
        for env in envs:
            yield store.enqueue(env, BODY)
        yield store.move(active.qid, ACTIVE)
        yield store.move(wrong_qid.qid, DEFERRED)
        os.unlink(os.path.join(self.root, "data", no_body.qid))
        with open(os.path.join(self.root, "incoming", garbled.qid), "wb") as f:
            f.write(b'{"qid": "trunc')
        with open(os.path.join(self.root, "deferred", wrong_qid.qid), "wb") as f:
            f.write(make_envelope().to_json())
        orphan = new_qid()
        for path in (f"data/{orphan}", f"tmp/{orphan}.body", f"tmp/{orphan}.env"):
            with open(os.path.join(self.root, path), "wb") as f:
                f.write(b"x")

        fresh = self.store()
        counts = fresh.recover()

        self.assertEqual(
            counts,
            {"tmp_removed": 2, "requeued": 1, "corrupt": 2, "missing_body": 1, "orphan_bodies": 1, "queued": 5},
        )
        self.assertEqual(fresh.list(INCOMING), [good.qid, active.qid])
        self.assertEqual(fresh.list(CORRUPT), [no_body.qid, garbled.qid, wrong_qid.qid])
        self.assertEqual(fresh.list(DEFERRED), [])
        self.assertRaises(ValueError, fresh.load, garbled.qid)
        self.assertEqual(fresh.read_body(garbled.qid), BODY)  # kept for the operator
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        self.assertRaises(KeyError, fresh.read_body, orphan)

    @defer.inlineCallbacks
    def test_lookups_find_a_message_moved_by_another_store_on_the_same_directory(self):
        mine, theirs = self.store(), self.store()
        env = make_envelope()
        yield mine.enqueue(env, BODY)
        self.assertEqual(theirs.state(env.qid), INCOMING)
        yield theirs.move(env.qid, HOLD)
        self.assertEqual(mine.state(env.qid), HOLD)
        self.assertEqual(mine.load(env.qid), env)
        yield mine.move(env.qid, DEFERRED)
        self.assertEqual(mine.list(DEFERRED), [env.qid])

    def test_unsafe_qids_never_reach_the_file_system(self):
        store = self.store()
        for bad in ("../data", "..", "tmp/x", ""):
            self.assertIsNone(store.state(bad))
            self.assertRaises(KeyError, store.load, bad)
            self.assertRaises(KeyError, store.read_body, bad)

    @defer.inlineCallbacks
    def test_concurrent_enqueues_share_directory_fsyncs(self):
        release = threading.Event()

        class SlowFirstDirSync(RecordingOps):
            def fsync_dir(self, path):
                release.wait(30)
                super().fsync_dir(path)

        ops = SlowFirstDirSync(self.root)
        pool = started_pool(self, maxthreads=8)
        store = MaildirQueueStore(self.root, reactor, pool, ops=ops)
        envs = [make_envelope() for _ in range(6)]
        done = defer.gatherResults([store.enqueue(env, BODY) for env in envs])
        for _ in range(3000):  # until the first commit is syncing and the five others wait for it
            if store.syncer.waiting == 5:
                break
            time.sleep(0.01)
        self.assertEqual(store.syncer.waiting, 5)
        release.set()
        yield done
        # one batch for the first message, one for the five that gathered meanwhile
        self.assertEqual([op for op, _ in ops.calls].count("fsync_dir"), 4)
        self.assertEqual(store.list(INCOMING), sorted(e.qid for e in envs))

    @defer.inlineCallbacks
    def test_failed_shared_directory_fsync_fails_every_message_of_the_batch(self):
        ops = RecordingOps(self.root, lambda i, op, path: OSError(errno.EIO, "I/O error") if op == "fsync_dir" else None)
        store = self.store(ops)
        results = yield defer.DeferredList([store.enqueue(make_envelope(), BODY) for _ in range(4)], consumeErrors=True)
        for ok, failure in results:
            self.assertFalse(ok)
            failure.trap(QueueError)
        self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_without_fsync_the_store_still_keeps_messages(self):
        store = MaildirQueueStore(self.root, reactor, self.pool, fsync=False)
        env = make_envelope()
        yield store.enqueue(env, BODY)
        self.assert_whole_message(self.store(), env)
