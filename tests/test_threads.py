"""pymta.threads.FilePool: what deferToThreadPool and ThreadPoolService need of a pool."""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pymta.threads import FilePool


class Boom(Exception):
    pass


class FilePoolTests(unittest.TestCase):
    def pool(self, size=4):
        pool = FilePool(size, "test")
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    @defer.inlineCallbacks
    def test_results_and_failures_come_back_to_the_reactor(self):
        pool = self.pool()
        main = threading.current_thread()
        ran_in = []

        def work(x):
            ran_in.append(threading.current_thread())
            return x * 2

        self.assertEqual((yield deferToThreadPool(reactor, pool, work, 21)), 42)
        self.assertIsNot(ran_in[0], main)

        def fail():
            raise Boom("no")

        yield self.assertFailure(deferToThreadPool(reactor, pool, fail), Boom)

    @defer.inlineCallbacks
    def test_size_threads_run_at_once(self):
        pool = self.pool(size=3)
        barrier = threading.Barrier(3, timeout=10)  # every job waits for the other two
        results = yield defer.gatherResults([deferToThreadPool(reactor, pool, barrier.wait) for _ in range(3)])
        self.assertEqual(sorted(results), [0, 1, 2])

    def test_jobs_given_before_start_run_after_it_and_stop_waits_for_them(self):
        pool = FilePool(2, "test")
        done = []
        for i in range(20):
            pool.callInThread(done.append, i)
        self.assertEqual(done, [])
        pool.start()
        pool.stop()  # returns once every job given before it has run
        self.assertEqual(sorted(done), list(range(20)))
        self.assertEqual([t for t in threading.enumerate() if t.name.startswith("test-")], [])
        self.assertRaises(RuntimeError, pool.callInThread, done.append, 99)  # nothing runs it any more

    def test_a_failure_nobody_waits_for_is_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pool = FilePool(1, "test")
        pool.start()

        def fail():
            raise Boom("unseen")

        pool.callInThread(fail)
        pool.stop()
        failures = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(Boom))
        self.flushLoggedErrors(Boom)

    def test_a_pool_needs_a_thread(self):
        self.assertRaises(ValueError, FilePool, 0, "none")

    @defer.inlineCallbacks
    def test_pool_threads_do_not_preempt_the_reactor_thread(self):
        """SCHED_BATCH in the pool's threads, and only there: the reactor thread keeps its policy."""
        import os

        if not hasattr(os, "SCHED_BATCH"):
            raise unittest.SkipTest("no SCHED_BATCH on this platform")
        before = os.sched_getscheduler(0)
        pool = self.pool(size=2)
        policies = yield defer.gatherResults([deferToThreadPool(reactor, pool, os.sched_getscheduler, 0) for _ in range(4)])
        self.assertEqual(policies, [os.SCHED_BATCH] * 4)
        self.assertEqual(os.sched_getscheduler(0), before)
        self.assertNotEqual(before, os.SCHED_BATCH)
