"""The queue stores: contract tests for the maildir spool and the in-memory fake, durability of the spool."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import threading
import time
import zlib

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pymta.envelope import Envelope, new_qid
from pymta.interfaces import ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, QUEUE_STATES, QueueError, QueueFull
from pymta.queue import qfile
from pymta.queue.store import INLINE_UNLINK_MAX, MaildirQueueStore, MemoryQueueStore, hash_dirs
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


def scratch_dir(test: unittest.TestCase) -> str:
    """A fresh directory for ``test``, removed after it (a store makes 256 hashed subdirectories)."""
    path = test.mktemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


class MaildirQueueStoreContractTests(QueueStoreContract, unittest.TestCase):
    def make_store(self):
        store = MaildirQueueStore(scratch_dir(self), reactor, started_pool(self))
        store.recover()
        return store


def queue_path(state: str, qid: str) -> str:
    """Where the layout puts ``qid`` in ``state`` (relative to the queue root)."""
    if state == DEFERRED:
        return os.path.join(state, *hash_dirs(qid, 2), qid)
    return os.path.join(state, qid)


def _enqueue_steps(qid: str) -> list[tuple[str, str]]:
    return [
        *[(op, f"tmp/{qid}") for op in ("open", "write", "fsync", "close", "rename")],
        ("fsync_dir", "incoming"),
    ]


COMMIT_STEP = 4  # the rename into incoming/ in _enqueue_steps


def read_file(root: str, rel: str) -> bytes:
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


def write_file(root: str, rel: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    with open(os.path.join(root, rel), "wb") as f:
        f.write(data)


class _OnDiskStoreTest(unittest.TestCase):
    """A queue directory of its own and stores over it (each with its own FileOps)."""

    def setUp(self):
        self.root = scratch_dir(self)
        self.pool = started_pool(self)

    def store(self, ops=None):
        return MaildirQueueStore(self.root, reactor, self.pool, ops=ops)

    @defer.inlineCallbacks
    def deferred(self, store, env):
        """Queue ``env`` and move it to deferred/: the path of its file there."""
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, DEFERRED)
        return os.path.join(self.root, queue_path(DEFERRED, env.qid))


class MaildirQueueStoreDurabilityTests(_OnDiskStoreTest):
    def assert_empty_queue(self):
        self.assertEqual(files_under(self.root), [])

    def assert_whole_message(self, store, env, state=INCOMING):
        self.assertEqual(store.load(env.qid), env)
        self.assertEqual(store.read_body(env.qid), BODY)
        self.assertEqual(files_under(self.root), [queue_path(state, env.qid)])

    def test_new_store_creates_private_directories_with_hashed_deferred(self):
        self.store()
        hashed = [os.path.join(DEFERRED, a, b) for a in "0123456789abcdef" for b in "0123456789abcdef"]
        for name in ("tmp", *QUEUE_STATES, *hashed):
            mode = os.stat(os.path.join(self.root, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o700, name)
        self.assertFalse(os.path.exists(os.path.join(self.root, "data")))

    @defer.inlineCallbacks
    def test_enqueue_writes_one_self_validating_file_with_body_and_envelope(self):
        env = make_envelope()
        yield self.store().enqueue(env, BODY)
        self.assertEqual(files_under(self.root), [f"incoming/{env.qid}"])
        raw = read_file(self.root, f"incoming/{env.qid}")
        self.assertEqual(qfile.parse_header(raw), (len(BODY), zlib.crc32(BODY)))
        self.assertEqual(raw[qfile.HEADER.size : qfile.HEADER.size + len(BODY)], BODY)
        records = qfile.scan_records(raw[qfile.HEADER.size + len(BODY) :])
        self.assertEqual((records.count, records.torn), (1, False))
        self.assertEqual(Envelope.from_json(records.last), env)

    @defer.inlineCallbacks
    def test_enqueue_fires_only_after_file_fsync_rename_and_directory_fsync(self):
        ops = RecordingOps(self.root)
        store = self.store(ops)
        del ops.calls[:]
        env = make_envelope()
        yield store.enqueue(env, BODY).addCallback(lambda _: ops.calls.append(("fired",)))
        self.assertEqual(ops.calls, [*_enqueue_steps(env.qid), ("fired",)])

    @defer.inlineCallbacks
    def test_enqueue_failure_at_any_step_leaves_nothing_and_names_the_cause(self):
        self.store()
        for step in range(len(_enqueue_steps("X"))):
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
        self.store()
        steps = _enqueue_steps("X")
        for step in range(len(steps)):
            env = make_envelope()
            crashing = self.store(RecordingOps(self.root, fail_at(step, Crash(step))))
            yield self.assertFailure(crashing.enqueue(env, BODY), Crash)
            store = self.store()
            counts = store.recover()
            self.assertEqual(counts["quarantined"], 0)
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
                self.assertEqual(counts["quarantined"], 0, (name, step))
                if store.state(env.qid) is None:
                    self.assertEqual(name, "remove")
                    self.assert_empty_queue()
                else:
                    self.assertIn(store.load(env.qid), (env, changed))
                    self.assertEqual(store.read_body(env.qid), BODY)
                    self.assertEqual(len(files_under(self.root)), 1)
                    yield store.remove(env.qid)
                if not crashed:  # every step of this change was tried
                    self.assertEqual(len(ops.calls), step)
                    break
            else:
                self.fail(f"{name} was never completed in 12 steps")

    @defer.inlineCallbacks
    def test_update_appends_a_record_in_place_and_fsyncs_it_creating_no_file(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, DEFERRED)
        path = queue_path(DEFERRED, env.qid)
        inode = os.stat(os.path.join(self.root, path)).st_ino
        ops = RecordingOps(self.root)
        env.attempts = 1
        yield self.store(ops).update(env).addCallback(lambda _: ops.calls.append(("fired",)))
        self.assertEqual(ops.calls, [(op, path) for op in ("open", "pwrite", "fsync", "close")] + [("fired",)])
        self.assertEqual(os.stat(os.path.join(self.root, path)).st_ino, inode)
        self.assertEqual(files_under(self.root), [path])
        self.assertEqual(store.load(env.qid).attempts, 1)
        raw = read_file(self.root, path)
        self.assertEqual(qfile.scan_records(raw[qfile.HEADER.size + len(BODY) :]).count, 2)

    @defer.inlineCallbacks
    def test_crash_at_every_step_of_an_update_keeps_the_old_or_the_new_envelope(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        for step in range(4):  # open, pwrite (torn: half the record reaches the file), fsync, close
            before = store.load(env.qid)
            changed = store.load(env.qid)
            changed.attempts += 1
            crashing = self.store(RecordingOps(self.root, fail_at(step, Crash(step))))
            yield self.assertFailure(crashing.update(changed), Crash)
            fresh = self.store()
            counts = fresh.recover()
            self.assertEqual(counts["quarantined"], 0)
            self.assertEqual(counts["torn_records"], 1 if step == 1 else 0, step)
            self.assertEqual(fresh.load(env.qid), before if step <= 1 else changed, step)
            self.assertEqual(fresh.read_body(env.qid), BODY)
            # the next update after a torn record is read back (the torn tail was cut off first)
            after = fresh.load(env.qid)
            after.envid = f"step{step}"
            yield fresh.update(after)
            self.assertEqual(self.store().load(env.qid), after)

    @defer.inlineCallbacks
    def test_torn_recipient_record_is_detected_and_that_recipient_is_retried(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, ACTIVE)
        done = store.load(env.qid)
        done.recipients[0].state = "delivered"
        done.recipients[0].reply = {"code": 250, "enhanced": "2.0.0", "text": "ok"}
        yield store.update(done)
        both = store.load(env.qid)
        both.recipients[1].state = "delivered"
        both.recipients[1].reply = {"code": 250, "enhanced": "2.0.0", "text": "ok"}
        pwrite_at = lambda i, op, path: Crash() if op == "pwrite" else None  # noqa: E731
        yield self.assertFailure(self.store(RecordingOps(self.root, pwrite_at)).update(both), Crash)

        fresh = self.store()
        with self.assertLogs("torn_record") as events:
            counts = fresh.recover()
        self.assertEqual(counts["torn_records"], 1)
        self.assertEqual(events[0]["qid"], env.qid)
        self.assertEqual(fresh.list(INCOMING), [env.qid])
        recovered = fresh.load(env.qid)
        self.assertEqual([r.state for r in recovered.recipients], ["delivered", "pending"])
        self.assertEqual([r.address for r in recovered.pending_recipients()], ["c@example.com"])

    def assertLogs(self, event):
        return _CapturedEvents(self, event)

    @defer.inlineCallbacks
    def test_many_updates_keep_the_file_bounded_by_rewriting_it(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, DEFERRED)
        path = os.path.join(self.root, queue_path(DEFERRED, env.qid))
        for i in range(400):
            env.attempts = i
            env.recipients[0].reply = {"code": 451, "enhanced": "4.4.1", "text": f"try {i} " + "x" * 200}
            yield store.update(env)
            self.assertLess(os.path.getsize(path), qfile.COMPACT_AFTER + 4096)
        self.assertEqual(self.store().load(env.qid), env)
        self.assertEqual(store.read_body(env.qid), BODY)
        self.assertEqual(files_under(self.root), [queue_path(DEFERRED, env.qid)])

    @defer.inlineCallbacks
    def test_the_due_time_is_kept_as_the_files_mtime_through_updates_and_rewrites(self):
        store = self.store()
        env = make_envelope(next_attempt=1_900_000_000.25)
        path = yield self.deferred(store, env)
        self.assertAlmostEqual(os.stat(path).st_mtime, 1_900_000_000.25, places=3)
        for i in range(300):  # past the rewrite threshold, more than once
            env.next_attempt = 1_900_000_100.0 + i
            env.recipients[0].reply = {"code": 451, "enhanced": "4.4.1", "text": f"try {i} " + "x" * 200}
            yield store.update(env)
            self.assertAlmostEqual(os.stat(path).st_mtime, env.next_attempt, places=3)
        env.not_before = 1_950_000_000.0  # a scheduled delivery later than the retry
        yield store.update(env)
        self.assertAlmostEqual(os.stat(path).st_mtime, 1_950_000_000.0, places=3)
        env.next_attempt = env.not_before = 0.0  # no due time: due now, not at the old one
        yield store.update(env)
        self.assertLess(abs(os.stat(path).st_mtime - time.time()), 60)

    @defer.inlineCallbacks
    def test_recovery_reads_deferred_messages_by_name_and_mtime_and_checks_each_at_its_load(self):
        store = self.store()
        sound = make_envelope(now=1_700_000_000.5, arrival=1_700_000_000.5, next_attempt=1_900_000_000.0)
        rotten = make_envelope(now=1_700_000_001.5, arrival=1_700_000_001.5, next_attempt=1_900_000_001.0)
        for env in (sound, rotten):
            yield store.enqueue(env, BODY)
            yield store.move(env.qid, DEFERRED)
        rotten_path = os.path.join(self.root, queue_path(DEFERRED, rotten.qid))
        with open(rotten_path, "r+b") as f:  # rotted while it waited; the mtime stays
            f.write(b"garbage!")
        os.utime(rotten_path, (1_900_000_001.0, 1_900_000_001.0))

        fresh = self.store()
        batches = []
        counts = yield fresh.recover_incrementally(batches.append)
        recovered = sorted(entry for batch in batches for entry in batch)
        self.assertEqual(len(recovered), 2)
        for (qid, state, due, arrival), env in zip(recovered, sorted((sound, rotten), key=lambda e: e.qid), strict=True):
            self.assertEqual((qid, state), (env.qid, DEFERRED))
            self.assertAlmostEqual(due, env.next_attempt, places=3)
            self.assertAlmostEqual(arrival, env.arrival, places=5)
        self.assertEqual(counts["quarantined"], 0)
        # The attempt's load is where the rotten file is found: quarantined, never delivered.
        self.assertEqual(fresh.load(sound.qid), sound)
        with self.assertLogs("quarantine"):
            self.assertRaises(ValueError, fresh.load, rotten.qid)
        self.assertEqual(fresh.state(rotten.qid), CORRUPT)
        self.assertEqual(fresh.list(DEFERRED), [sound.qid])
        # The synchronous recover() (tools, tests) still reads every file.
        self.assertEqual(self.store().recover()["queued"], 1)

    @defer.inlineCallbacks
    def test_a_rotten_file_found_on_the_reactor_thread_is_synced_into_corrupt_by_a_pool_thread(self):
        store = self.store()
        env = make_envelope(next_attempt=1_900_000_000.0)
        path = yield self.deferred(store, env)
        with open(path, "r+b") as f:
            f.write(b"garbage!")
        syncs = []
        synced = defer.Deferred()

        class WhereOps(RecordingOps):
            def fsync_dir(self, path):
                super().fsync_dir(path)
                syncs.append((os.path.relpath(path, self.base), threading.current_thread() is threading.main_thread()))
                if len(syncs) == 2:
                    reactor.callFromThread(synced.callback, None)

        finding = self.store(WhereOps(self.root))
        with self.assertLogs("quarantine"):
            self.assertRaises(ValueError, finding.load, env.qid)
        self.assertEqual(finding.state(env.qid), CORRUPT)  # renamed at once
        # No fsync ran on the reactor thread (the pool's threads may have done theirs already).
        self.assertEqual([where for where in syncs if where[1]], [])
        yield synced
        self.assertEqual(sorted(syncs), sorted([(os.path.dirname(queue_path(DEFERRED, env.qid)), False), (CORRUPT, False)]))

    @defer.inlineCallbacks
    def test_a_rotten_file_found_after_the_writing_threads_stopped_is_still_quarantined_and_synced(self):
        from pymta.threads import FilePool

        env = make_envelope(next_attempt=1_900_000_000.0)
        path = yield self.deferred(self.store(), env)
        with open(path, "r+b") as f:
            f.write(b"garbage!")
        stopped = FilePool(1, "stopped")
        stopped.start()
        stopped.stop()  # late in a shutdown: the pool refuses new jobs
        ops = RecordingOps(self.root)
        finding = MaildirQueueStore(self.root, reactor, stopped, ops=ops)
        with self.assertLogs("quarantine"):
            self.assertRaises(ValueError, finding.load_message, env.qid)
        self.assertEqual(finding.state(env.qid), CORRUPT)
        self.assertEqual(sorted(path for op, path in ops.calls if op == "fsync_dir"),
                         sorted([os.path.dirname(queue_path(DEFERRED, env.qid)), CORRUPT]))  # fmt: skip

    @defer.inlineCallbacks
    def test_an_attempt_holds_a_large_body_once(self):
        import tracemalloc

        store = self.store()
        env, body = make_envelope(), b"z" * 8_000_000 + b"\r\n"
        yield store.enqueue(env, body)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        loaded, read = store.load_message(env.qid)
        _, peak = tracemalloc.get_traced_memory()
        self.assertEqual((loaded, read), (env, body))
        self.assertLess(peak, 1.25 * len(body))  # not the whole file and a slice of it

    @defer.inlineCallbacks
    def test_remove_unlinks_the_one_file_and_syncs_its_directory(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        yield store.move(env.qid, DEFERRED)
        ops = RecordingOps(self.root)
        yield self.store(ops).remove(env.qid)
        path = queue_path(DEFERRED, env.qid)
        self.assertEqual(ops.calls, [("unlink", path), ("fsync_dir", os.path.dirname(path))])
        self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_a_removal_that_need_not_be_durable_only_unlinks(self):
        # A message delivered to every recipient: its outcomes are in the accounting log already,
        # so a crash that undoes the unlink means a second delivery, and no directory fsync is paid.
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        ops = RecordingOps(self.root)
        removing = self.store(ops)
        yield removing.remove(env.qid, durable=False)
        self.assertIsNone(removing.state(env.qid))
        self.assertEqual(removing.list(INCOMING), [])
        self.assertRaises(KeyError, removing.load, env.qid)
        self.assertEqual(ops.calls, [("unlink", queue_path(INCOMING, env.qid))])
        self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_only_a_small_file_is_unlinked_on_the_reactor_thread(self):
        # Freeing a large file takes milliseconds: that unlink goes to the writing thread.
        store = self.store()
        small, large = make_envelope(), make_envelope()
        yield store.enqueue(small, BODY)
        yield store.enqueue(large, b"x" * (INLINE_UNLINK_MAX + 1))
        threads = {}

        class WhereOps(RecordingOps):
            def unlink(self, path):
                threads[os.path.basename(path)] = threading.current_thread() is threading.main_thread()
                return super().unlink(path)

        removing = self.store(WhereOps(self.root))
        for env in (small, large):
            yield removing.move(env.qid, ACTIVE)  # the index knows where they are, as in an attempt
            yield removing.remove(env.qid, durable=False)
        self.assertEqual(threads, {small.qid: True, large.qid: False})
        self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_a_move_into_active_is_a_rename_only_and_recovery_undoes_it(self):
        store = self.store()
        env = make_envelope()
        yield store.enqueue(env, BODY)
        ops = RecordingOps(self.root)
        yield self.store(ops).move(env.qid, ACTIVE)
        self.assertEqual(ops.calls, [("rename", queue_path(INCOMING, env.qid))])
        ops = RecordingOps(self.root)
        yield self.store(ops).move(env.qid, DEFERRED)  # any other state: both directories synced
        self.assertEqual(sorted(op for op, _ in ops.calls), ["fsync_dir", "fsync_dir", "rename"])
        yield store.move(env.qid, ACTIVE)
        recovered = self.store()
        recovered.recover()  # a restart: an attempt that was running is queued again
        self.assertEqual(recovered.state(env.qid), INCOMING)
        self.assertEqual(recovered.read_body(env.qid), BODY)

    @defer.inlineCallbacks
    def test_deferred_messages_are_spread_over_hashed_directories(self):
        store = self.store()
        envs = [make_envelope(now=1_700_000_000 + i / 1000) for i in range(512)]
        yield defer.gatherResults([store.enqueue(env, BODY) for env in envs])
        yield defer.gatherResults([store.move(env.qid, DEFERRED) for env in envs])
        self.assertEqual(os.listdir(os.path.join(self.root, DEFERRED)).__len__(), 16)
        per_dir = {}
        for rel in files_under(self.root):
            self.assertTrue(rel.startswith("deferred/"), rel)
            per_dir[os.path.dirname(rel)] = per_dir.get(os.path.dirname(rel), 0) + 1
        self.assertGreater(len(per_dir), 200)  # 512 spread over up to 256 directories
        self.assertLess(max(per_dir.values()), 16)
        self.assertEqual(store.list(DEFERRED), sorted(e.qid for e in envs))
        self.assertEqual(self.store().list(DEFERRED), sorted(e.qid for e in envs))
        yield store.move(envs[7].qid, HOLD)
        self.assertEqual(self.store().state(envs[7].qid), HOLD)

    @defer.inlineCallbacks
    def test_recover_quarantines_what_it_cannot_trust_and_counts_it(self):
        store = self.store()
        big = bytes(range(256)) * 512  # 128 KiB: size checked at recovery, checksum before delivery
        good, active, torn_body, garbled, wrong_qid, no_header = envs = [
            make_envelope(now=1_700_000_000 + i) for i in range(6)
        ]
        for env in envs:
            yield store.enqueue(env, BODY)
        yield store.move(active.qid, ACTIVE)
        yield store.move(wrong_qid.qid, DEFERRED)
        rotten = make_envelope(now=1_700_000_010)
        yield store.enqueue(rotten, big)
        path = os.path.join(self.root, f"incoming/{torn_body.qid}")
        os.truncate(path, qfile.HEADER.size + 10)  # the body cut short while the MTA was stopped
        raw = read_file(self.root, f"incoming/{garbled.qid}")
        write_file(self.root, f"incoming/{garbled.qid}", raw[:-5])  # its only envelope record torn
        other = make_envelope()
        write_file(self.root, queue_path(DEFERRED, wrong_qid.qid), qfile.header(BODY) + BODY + qfile.record(other.to_json()))
        write_file(self.root, f"incoming/{no_header.qid}", b"garbage")
        raw = bytearray(read_file(self.root, f"incoming/{rotten.qid}"))
        raw[qfile.HEADER.size + 100_000] ^= 0xFF  # one flipped bit deep in a large body
        write_file(self.root, f"incoming/{rotten.qid}", bytes(raw))
        orphan = new_qid()
        write_file(self.root, f"tmp/{orphan}", b"x")

        fresh = self.store()
        with self.assertLogs("queue_recovered") as events:
            counts = fresh.recover()

        self.assertEqual(
            counts,
            {"tmp_removed": 1, "requeued": 1, "corrupt": 3, "torn_body": 1, "missing_body": 0, "orphan_bodies": 0,
             "torn_records": 0, "migrated": 0, "queued": 3, "quarantined": 4, "in_corrupt": 4},
        )  # fmt: skip
        self.assertIn("queued 3, quarantined 4", events.text(0))
        self.assertEqual(fresh.list(INCOMING), [good.qid, active.qid, rotten.qid])
        self.assertEqual(fresh.list(CORRUPT), [torn_body.qid, garbled.qid, wrong_qid.qid, no_header.qid])
        self.assertEqual(fresh.list(DEFERRED), [])
        self.assertRaises(ValueError, fresh.load, garbled.qid)
        self.assertEqual(fresh.read_body(garbled.qid), BODY)  # kept for the operator
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        # the flipped bit is found before delivery: the message goes to corrupt/, counted, never sent
        self.assertEqual(fresh.load(rotten.qid), rotten)
        with self.assertLogs("quarantine") as events:
            self.assertRaises(ValueError, fresh.read_body, rotten.qid)
        self.assertIn("checksum", events[0]["reason"])
        self.assertEqual(fresh.state(rotten.qid), CORRUPT)
        self.assertEqual(self.store().state(rotten.qid), CORRUPT)
        self.assertEqual(fresh.quarantined, 5)

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
        self.assertEqual(theirs.load(env.qid), env)

    @defer.inlineCallbacks
    def test_a_store_that_only_enqueues_keeps_no_memory_per_message_another_store_removed(self):
        # A listener worker enqueues; the main process delivers and removes. Allocated bytes (not
        # RSS, not time) over 1,000 messages must not grow with them. The Deferred and thread-pool
        # machinery keeps a few kilobytes whatever the count; a per-message leak of 16 bytes shows.
        import gc
        import tracemalloc

        listener = MaildirQueueStore(self.root, reactor, self.pool, fsync=False)
        main = MaildirQueueStore(self.root, reactor, self.pool, fsync=False)

        @defer.inlineCallbacks
        def accept_and_deliver(n):
            for _ in range(n // 50):  # 50 at a time, as concurrent sessions would
                envelopes = [make_envelope() for _ in range(50)]
                yield defer.gatherResults([listener.enqueue(env, BODY) for env in envelopes])
                yield defer.gatherResults([main.remove(env.qid) for env in envelopes])

        yield accept_and_deliver(100)  # warm-up: caches, thread pool, interned names
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        yield accept_and_deliver(100)  # so that both snapshots hold the same last batch's leftovers
        gc.collect()
        before = tracemalloc.take_snapshot()
        yield accept_and_deliver(1000)
        gc.collect()
        after = tracemalloc.take_snapshot()
        own = [tracemalloc.Filter(False, tracemalloc.__file__)]  # the tracer's own bookkeeping
        changes = after.filter_traces(own).compare_to(before.filter_traces(own), "filename")
        grown = sum(d.size_diff for d in changes if d.size_diff > 0)
        self.assertLess(grown, 1000 * 16, f"{grown} bytes kept for 1,000 messages no longer queued")
        self.assertEqual(files_under(self.root), [])

    def test_unsafe_qids_never_reach_the_file_system(self):
        store = self.store()
        for bad in ("../data", "..", "tmp/x", ""):
            self.assertIsNone(store.state(bad))
            self.assertRaises(KeyError, store.load, bad)
            self.assertRaises(KeyError, store.read_body, bad)

    @defer.inlineCallbacks
    def test_enqueue_many_fsyncs_each_file_and_the_directory_once(self):
        self.store()  # the layout is made
        envs = [make_envelope() for _ in range(5)]
        ops = RecordingOps(self.root)
        out = yield self.store(ops).enqueue_many([(env, BODY) for env in envs])
        self.assertEqual(out, [env.qid for env in envs])
        expected = [step for env in envs for step in _enqueue_steps(env.qid)[:-1]] + [("fsync_dir", "incoming")]
        self.assertEqual(ops.calls, expected)

    @defer.inlineCallbacks
    def test_enqueue_many_leaves_nothing_when_the_directory_fsync_fails(self):
        self.store()
        ops = RecordingOps(self.root, lambda i, op, path: OSError(errno.EIO, "I/O error") if op == "fsync_dir" else None)
        out = yield self.store(ops).enqueue_many([(make_envelope(), BODY) for _ in range(3)])
        self.assertEqual([type(e) for e in out], [QueueError] * 3)
        self.assertEqual(files_under(self.root), [])

    @defer.inlineCallbacks
    def test_enqueue_many_answers_a_full_disk_for_the_message_it_hit(self):
        self.store()
        envs = [make_envelope() for _ in range(3)]
        full = OSError(errno.ENOSPC, "No space left on device")
        ops = RecordingOps(self.root, lambda i, op, path: full if op == "write" and envs[1].qid in path else None)
        out = yield self.store(ops).enqueue_many([(env, BODY) for env in envs])
        self.assertEqual(out[0], envs[0].qid)
        self.assertIsInstance(out[1], QueueFull)
        self.assertEqual(out[2], envs[2].qid)
        self.assertEqual(files_under(self.root), sorted(queue_path(INCOMING, e.qid) for e in (envs[0], envs[2])))

    @defer.inlineCallbacks
    def test_concurrent_enqueues_share_directory_fsyncs(self):
        release = threading.Event()
        armed = threading.Event()

        class SlowFirstDirSync(RecordingOps):
            def fsync_dir(self, path):
                if armed.is_set():
                    release.wait(30)
                super().fsync_dir(path)

        ops = SlowFirstDirSync(self.root)
        pool = started_pool(self, maxthreads=8)
        store = MaildirQueueStore(self.root, reactor, pool, ops=ops)
        del ops.calls[:]
        armed.set()
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
        self.assertEqual([op for op, _ in ops.calls].count("fsync_dir"), 2)
        self.assertEqual(store.list(INCOMING), sorted(e.qid for e in envs))

    @defer.inlineCallbacks
    def test_failed_shared_directory_fsync_fails_every_message_of_the_batch(self):
        self.store()
        ops = RecordingOps(self.root, lambda i, op, path: OSError(errno.EIO, "I/O error") if op == "fsync_dir" else None)
        store = self.store(ops)
        results = yield defer.DeferredList([store.enqueue(make_envelope(), BODY) for _ in range(4)], consumeErrors=True)
        for ok, failure in results:
            self.assertFalse(ok)
            failure.trap(QueueError)
        self.assert_empty_queue()

    @defer.inlineCallbacks
    def test_without_fsync_the_store_still_keeps_messages_and_never_fsyncs(self):
        self.store()
        synced = []
        real_fsync = os.fsync
        self.patch(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
        store = MaildirQueueStore(self.root, reactor, self.pool, fsync=False)
        env = make_envelope()
        yield store.enqueue(env, BODY)
        env.attempts = 2
        yield store.update(env)
        yield store.move(env.qid, DEFERRED)
        self.assertEqual(synced, [])
        yield self.store().move(env.qid, INCOMING)
        self.assertEqual(len(synced), 2)  # the fsyncing store does sync: the counter would see it
        self.assert_whole_message(self.store(), env)


def _legacy_queue(root: str, messages: list[tuple[str, Envelope, bytes | None]]) -> None:
    """Write a queue as the previous release did: JSON envelope files per state, bodies in data/."""
    for state in ("tmp", "data", *QUEUE_STATES):
        os.makedirs(os.path.join(root, state), exist_ok=True)
    for state, env, body in messages:
        write_file(root, f"{state}/{env.qid}", env.to_json())
        if body is not None:
            write_file(root, f"data/{env.qid}", body)


class LegacyQueueMigrationTests(_OnDiskStoreTest):
    """A queue of the previous release (envelope JSON + data/ bodies) is migrated at start."""

    def legacy(self):
        envs = [make_envelope(now=1_700_000_000 + i) for i in range(6)]
        envs[1].attempts, envs[1].next_attempt = 3, 1_700_009_999.5
        envs[1].recipients[0].state = "delivered"
        messages = [
            (INCOMING, envs[0], BODY), (DEFERRED, envs[1], BODY + b"deferred\r\n"), (HOLD, envs[2], b""),
            (ACTIVE, envs[3], BODY), (DEFERRED, envs[4], None),
        ]  # fmt: skip
        _legacy_queue(self.root, messages)
        write_file(self.root, f"corrupt/{envs[5].qid}", b'{"qid": "tr')
        write_file(self.root, f"data/{envs[5].qid}", BODY)
        write_file(self.root, f"data/{new_qid()}", b"orphan")
        return messages, envs

    def assert_migrated(self, store, messages, envs):
        expected = {INCOMING: [envs[0].qid, envs[3].qid], DEFERRED: [envs[1].qid], HOLD: [envs[2].qid]}
        for state, qids in expected.items():
            self.assertEqual(store.list(state), qids)
        for _state, env, body in messages[:4]:
            self.assertEqual(store.load(env.qid), env)
            self.assertEqual(store.read_body(env.qid), body)
        self.assertEqual(store.load(envs[1].qid).next_attempt, 1_700_009_999.5)
        self.assertFalse(os.path.exists(os.path.join(self.root, "data")))
        self.assertEqual(
            files_under(self.root),
            sorted([
                f"corrupt/{envs[4].qid}", f"corrupt/{envs[5].qid}", f"corrupt/{envs[5].qid}.body",
                f"hold/{envs[2].qid}", f"incoming/{envs[0].qid}", f"incoming/{envs[3].qid}",
                queue_path(DEFERRED, envs[1].qid),
            ]),
        )  # fmt: skip
        for rel in files_under(self.root):
            if not rel.startswith("corrupt/"):
                self.assertTrue(qfile.is_queue_file(read_file(self.root, rel)), rel)
        self.assertEqual(read_file(self.root, f"corrupt/{envs[5].qid}.body"), BODY)  # kept for the operator

    def test_recover_migrates_every_message_with_its_state_and_body(self):
        messages, envs = self.legacy()
        store = self.store()
        counts = store.recover()
        self.assertEqual(
            (counts["migrated"], counts["missing_body"], counts["orphan_bodies"], counts["requeued"], counts["queued"]),
            (4, 1, 1, 1, 4),
        )
        self.assert_migrated(store, messages, envs)
        self.assertEqual(self.store().recover()["migrated"], 0)  # nothing left to do at the next start

    def test_migration_is_resumed_after_a_crash_at_any_step(self):
        for step in itertools.count():
            self.root = scratch_dir(self)
            messages, envs = self.legacy()
            self.store()  # the new layout's directories (a crash while making them loses nothing)
            try:
                self.store(RecordingOps(self.root, fail_at(step, Crash(step)))).recover()
            except Crash:
                pass
            else:
                self.assertGreater(step, 20)  # every step of the migration was crashed at once
                break
            fresh = self.store()
            fresh.recover()
            self.assert_migrated(fresh, messages, envs)

    def test_pymta_queue_on_a_stopped_mta_reads_a_migrated_queue(self):
        _messages, envs = self.legacy()
        store = self.store()
        store.migrate()
        self.assertEqual(store.load(envs[1].qid), envs[1])
        self.assertEqual(store.read_body(envs[0].qid), BODY)


class _CapturedEvents:
    """Collect twisted.logger events whose ``event`` field is ``name`` while the block runs."""

    def __init__(self, test, name):
        self.test, self.name, self.events = test, name, []

    def __enter__(self):
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self._observe)
        if exc[0] is None:
            self.test.assertTrue(self.events, f"no {self.name} event logged")

    def _observe(self, event):
        if event.get("event") == self.name:
            self.events.append(event)

    def __getitem__(self, i):
        return self.events[i]

    def text(self, i):
        return formatEvent(self.events[i])


class DeliveryChecksTheBodyTests(_OnDiskStoreTest):
    @defer.inlineCallbacks
    def test_a_body_rotten_on_disk_is_quarantined_and_never_delivered(self):
        from pymta.envelope import ROUTE_RELAY
        from pymta.queue.manager import QueueManager
        from tests.fakes import ScriptedDeliveryAgent

        store = self.store()
        big = b"X" * 76 + b"\r\n"
        rotten, sound = make_envelope(now=1_700_000_000), make_envelope(now=1_700_000_001)
        yield store.enqueue(rotten, big * 2000)  # 156 KB: only its size is checked at recovery
        yield store.enqueue(sound, big * 2000)
        path = os.path.join(self.root, f"incoming/{rotten.qid}")
        raw = bytearray(read_file(self.root, f"incoming/{rotten.qid}"))
        raw[qfile.HEADER.size + 150_000] = ord("Y")
        write_file(self.root, f"incoming/{rotten.qid}", bytes(raw))
        self.assertEqual(os.path.getsize(path), len(raw))

        agent = ScriptedDeliveryAgent()
        fresh = self.store()
        manager = QueueManager(
            fresh, {ROUTE_RELAY: agent}, reactor, "mx.example.test", retry_initial=300, retry_max=3600,
            max_age=86400, delay_warning=7200, max_active=10, route_for=lambda a: ROUTE_RELAY,
        )  # fmt: skip
        with _CapturedEvents(self, "quarantine") as events:
            manager.startService()
            self.addCleanup(manager.stopService)
            for _ in range(500):  # bounded: until both messages are settled
                if fresh.state(sound.qid) is None and fresh.state(rotten.qid) == CORRUPT:
                    break
                yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(fresh.state(rotten.qid), CORRUPT)
        self.assertIsNone(fresh.state(sound.qid))
        self.assertEqual({call[0] for call in agent.calls}, {sound.qid})  # one call per recipient domain
        self.assertEqual([e["qid"] for e in events], [rotten.qid])
        self.assertEqual(fresh.quarantined, 1)


class MaildirQueueStoreSpareTests(_OnDiskStoreTest):
    """Finished queue files kept in spare/ and written over by new mail (no inode freed or allocated)."""

    def store(self, ops=None, spares=4):
        return MaildirQueueStore(self.root, reactor, self.pool, ops=ops, spares=spares)

    @defer.inlineCallbacks
    def finish(self, store, env, body=BODY, due_ahead=0.0):
        """Queue ``env`` and take it through an attempt that finished it (active/, removal not durable);
        ``due_ahead``: it was due that many seconds from now (its file's mtime), delivered early."""
        yield store.enqueue(env, body)
        if due_ahead:
            due = time.time() + due_ahead
            os.utime(os.path.join(self.root, queue_path(INCOMING, env.qid)), (due, due))
        yield store.move(env.qid, ACTIVE)
        yield store.remove(env.qid, durable=False)

    def spares(self):
        return sorted(os.listdir(os.path.join(self.root, "spare")))

    @defer.inlineCallbacks
    def test_a_finished_file_becomes_a_spare_and_the_next_message_is_written_over_it(self):
        store = self.store()
        old = make_envelope()
        yield store.enqueue(old, b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n")
        inode = os.stat(os.path.join(self.root, queue_path(INCOMING, old.qid))).st_ino
        yield store.move(old.qid, ACTIVE)
        yield store.remove(old.qid, durable=False)
        self.assertIsNone(store.state(old.qid))
        self.assertEqual(self.spares(), [old.qid])
        self.assertEqual(files_under(self.root), [f"spare/{old.qid}"])
        ops = RecordingOps(self.root)
        writer = self.store(ops)  # another process, as a listener worker
        new = make_envelope()
        yield writer.enqueue(new, BODY)
        path = os.path.join(self.root, queue_path(INCOMING, new.qid))
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertEqual(self.spares(), [])
        self.assertEqual(writer.load(new.qid), new)
        self.assertEqual(writer.read_body(new.qid), BODY)
        self.assertEqual(read_file(self.root, queue_path(INCOMING, new.qid)),
                         b"".join([qfile.header(BODY), BODY, qfile.record(new.to_json())]))  # nothing of the old left
        self.assertEqual(ops.calls, [
            ("rename", f"spare/{old.qid}"), ("open", f"tmp/{new.qid}"), ("write", f"tmp/{new.qid}"),
            ("ftruncate", f"tmp/{new.qid}"), ("fsync", f"tmp/{new.qid}"), ("close", f"tmp/{new.qid}"),
            ("rename", f"tmp/{new.qid}"), ("fsync_dir", "incoming"),
        ])  # fmt: skip

    @defer.inlineCallbacks
    def test_only_small_finished_files_in_active_are_kept_and_no_more_than_the_limit(self):
        off = MaildirQueueStore(self.root, reactor, self.pool)  # spares = 0: never kept, never taken
        kept = [make_envelope() for _ in range(4)]
        for env in kept:
            yield off.enqueue(env, BODY)
        store = self.store(spares=2)
        for env in kept:
            yield store.move(env.qid, ACTIVE)
            yield store.remove(env.qid, durable=False)
        expected = sorted(e.qid for e in kept[:2])
        self.assertEqual(self.spares(), expected)
        large, deleted, incoming = make_envelope(), make_envelope(), make_envelope()
        yield off.enqueue(large, b"x" * (INLINE_UNLINK_MAX + 1))
        yield off.enqueue(deleted, BODY)
        yield off.enqueue(incoming, BODY)
        roomy = self.store(spares=10)
        for env in (large, deleted):
            yield roomy.move(env.qid, ACTIVE)
        yield roomy.remove(large.qid, durable=False)
        yield roomy.remove(deleted.qid)  # an operator's delete: durable, and really gone
        yield roomy.remove(incoming.qid, durable=False)  # not finished by an attempt
        self.assertEqual(self.spares(), expected)
        self.assertEqual(files_under(self.root), [f"spare/{qid}" for qid in expected])
        yield self.finish(off, make_envelope())
        yield off.enqueue(make_envelope(), BODY)
        self.assertEqual(self.spares(), expected)

    @defer.inlineCallbacks
    def test_a_spare_taken_by_another_process_first_is_skipped(self):
        store = self.store()
        first = make_envelope()
        yield self.finish(store, first)
        slow, quick = self.store(), self.store()
        self.assertTrue(slow._look_for_spares())  # it has seen the spare
        yield quick.enqueue(make_envelope(), BODY)  # and another process took it
        env = make_envelope()
        yield slow.enqueue(env, BODY)
        self.assertEqual(slow.load(env.qid), env)
        self.assertEqual(slow.read_body(env.qid), BODY)
        self.assertEqual(len(store.list(INCOMING)), 2)

    @defer.inlineCallbacks
    def test_crash_at_any_step_of_a_write_over_a_spare_recovers_whole_message_or_nothing(self):
        for step in range(8):
            yield self.finish(self.store(), make_envelope())
            env = make_envelope()
            crashing = self.store(RecordingOps(self.root, fail_at(step, Crash(step))))
            yield self.assertFailure(crashing.enqueue(env, BODY), Crash)
            self.assertEqual(crashing_calls := [c[0] for c in crashing._ops.calls][:1], ["rename"])
            store = self.store()
            counts = store.recover()
            self.assertEqual(counts["quarantined"], 0, step)
            if step > 6:  # renamed into incoming/: the message must survive
                self.assertEqual(store.load(env.qid), env)
            if store.state(env.qid) is not None:
                self.assertEqual(store.load(env.qid), env)
                self.assertEqual(store.read_body(env.qid), BODY)
                yield store.remove(env.qid)
            self.assertEqual([f for f in files_under(self.root) if not f.startswith("spare/")], [], (step, crashing_calls))

    @defer.inlineCallbacks
    def test_a_stale_second_name_left_by_a_crash_is_neither_written_over_nor_delivered(self):
        # Without a journal, a crash can bring back a spare's old names after fsck: they are then
        # second links to the file of the message written over the spare.
        store = self.store()
        finished = make_envelope()
        yield self.finish(store, finished)
        live = make_envelope()
        yield self.store().enqueue(live, BODY)  # written over the spare
        self.assertEqual(self.spares(), [])
        path = os.path.join(self.root, queue_path(INCOMING, live.qid))
        os.link(path, os.path.join(self.root, "spare", finished.qid))
        os.link(path, os.path.join(self.root, queue_path(ACTIVE, finished.qid)))
        restarted = self.store()
        counts = restarted.recover()
        self.assertEqual((counts["queued"], counts["quarantined"]), (1, 0))
        self.assertIsNone(restarted.state(finished.qid))
        self.assertEqual(os.stat(path).st_nlink, 2)  # the stale spare name is still there
        after = make_envelope()
        yield restarted.enqueue(after, BODY)  # does not take it
        self.assertNotEqual(os.stat(os.path.join(self.root, queue_path(INCOMING, after.qid))).st_ino, os.stat(path).st_ino)
        self.assertEqual(os.stat(path).st_nlink, 1)  # the stale name was dropped, the message kept
        self.assertEqual(restarted.load(live.qid), live)
        self.assertEqual(restarted.read_body(live.qid), BODY)
        self.assertEqual(self.spares(), [])

    @defer.inlineCallbacks
    def test_an_unusable_spare_directory_never_stops_the_queue(self):
        store = self.store()
        yield self.finish(store, make_envelope())
        spare = os.path.join(self.root, "spare")
        shutil.rmtree(spare)
        with open(spare, "wb") as f:  # spare/ is now a file: every rename into or out of it fails
            f.write(b"x")
        finished, new = make_envelope(), make_envelope()
        yield self.finish(store, finished)  # unlinked instead
        yield self.store().enqueue(new, BODY)  # a new file instead
        self.assertIsNone(store.state(finished.qid))
        self.assertEqual(store.load(new.qid), new)
        self.assertEqual(files_under(self.root), sorted(["spare", queue_path(INCOMING, new.qid)]))

    @defer.inlineCallbacks
    def test_spares_not_reused_for_a_while_are_swept(self):
        store = self.store()
        old, recent = make_envelope(), make_envelope()
        # A deferred message's file carries its due time as mtime, here an hour ahead: what counts
        # is when it became a spare.
        yield self.finish(store, old, due_ahead=3600)
        time.sleep(0.05)
        between = time.time()
        time.sleep(0.05)
        yield self.finish(store, recent)
        swept = yield store.sweep_spares(between)
        self.assertEqual(swept, 1)
        self.assertEqual(self.spares(), [recent.qid])
        self.assertEqual((yield store.sweep_spares(between)), 0)
        later = make_envelope()
        yield self.finish(store, later)  # counted again: still kept
        self.assertEqual(self.spares(), sorted([recent.qid, later.qid]))

    @defer.inlineCallbacks
    def test_short_of_room_no_file_is_kept_and_the_spares_are_unlinked(self):
        low = [False]
        store = self.store(spares=8)
        store.space_low = lambda: low[0]
        kept = [make_envelope() for _ in range(3)]
        for env in kept:
            yield self.finish(store, env)
        self.assertEqual(self.spares(), sorted(e.qid for e in kept))
        low[0] = True
        for _ in range(3):  # each removal while short: unlinked, and one release of spare/
            env = make_envelope()
            yield self.finish(store, env)
            self.assertIsNone(store.state(env.qid))
        for _ in range(500):  # the release runs on a writing thread: at most 5 s
            if not self.spares() and not store._releasing:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.spares(), [])
        self.assertEqual(files_under(self.root), [])  # nothing left anywhere
        writer = self.store()  # a listener worker meanwhile: new files, nothing to claim
        new = make_envelope()
        yield writer.enqueue(new, BODY)
        self.assertEqual(writer.read_body(new.qid), BODY)
        low[0] = False  # room again: finished files are kept again
        yield store.move(new.qid, ACTIVE)
        yield store.remove(new.qid, durable=False)
        self.assertEqual(self.spares(), [new.qid])


def test_spares_are_released_before_they_could_make_mail_be_refused():
    from pymta.config import build_config
    from pymta.tap import space_needed, spare_space_low

    config = build_config({"queue": {"min_free": 1_000_000, "spare_files": 10}, "smtp": {"max_message_size": 2_000_000}})
    assert space_needed(config) == 1_000_000 + 3_000_000
    free = [0]
    low = spare_space_low(config, lambda: free[0])
    margin = 4_000_000 + 10 * INLINE_UNLINK_MAX
    free[0] = margin + 1
    assert not low()
    free[0] = margin
    assert low()
    free[0] = space_needed(config) + 1  # MAIL still accepted here, and the spares already go
    assert low()


def test_the_main_process_sweeps_spares_every_minute_with_its_clock():
    from pymta.tap import SPARE_MAX_AGE, _spare_sweeper

    clock = task.Clock()
    clock.advance(10_000)
    asked = []

    class Store:
        def sweep_spares(self, before):
            asked.append(before)
            return defer.succeed(0)

    sweeper = _spare_sweeper(Store(), clock)
    sweeper.startService()
    clock.advance(60)
    clock.advance(60)
    sweeper.stopService()
    clock.advance(600)
    assert asked == [10_000 - SPARE_MAX_AGE, 10_060 - SPARE_MAX_AGE, 10_120 - SPARE_MAX_AGE]
