"""The rendering thread of the injection API: many recipients a hop, each bounded in time on its
own (a runaway job is interrupted and fails alone, the jobs after it still run), and a chunk that
ends early once its output adds up to the byte budget."""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pymta.admin.http.inject import BoundedRenderer, RenderTimeout, TemplateError


def build(kind: str, n: int) -> bytes:
    if kind == "spin":
        deadline = time.monotonic() + 30  # bounded: the test fails on its timeout if never interrupted
        while time.monotonic() < deadline:
            pass
    if kind == "bad":
        raise TemplateError(f"job {n} is broken")
    return b"x" * n


class BoundedRendererTests(unittest.TestCase):
    timeout = 20

    def renderer(self, timeout: float) -> BoundedRenderer:
        r = BoundedRenderer(reactor, timeout)
        self.addCleanup(r.stop)
        return r

    @defer.inlineCallbacks
    def test_results_come_in_order_with_each_failure_in_its_place(self):
        out = yield self.renderer(5).run_each(build, [("ok", 3), ("bad", 7), ("ok", 5)])
        self.assertEqual(out[0], b"xxx")
        self.assertIsInstance(out[1], TemplateError)
        self.assertEqual(str(out[1]), "job 7 is broken")
        self.assertEqual(out[2], b"xxxxx")

    @defer.inlineCallbacks
    def test_a_runaway_job_is_interrupted_and_the_jobs_after_it_still_run(self):
        started = time.monotonic()
        out = yield self.renderer(0.4).run_each(build, [("ok", 1), ("spin", 0), ("ok", 2), ("spin", 0), ("ok", 4)])
        elapsed = time.monotonic() - started
        self.assertEqual(out[0], b"x")
        self.assertIsInstance(out[1], RenderTimeout)
        self.assertEqual(out[2], b"xx")
        self.assertIsInstance(out[3], RenderTimeout)
        self.assertEqual(out[4], b"xxxx")
        self.assertLess(elapsed, 10)  # each runaway was cut near its 0.4 s, not after its 30 s

    @defer.inlineCallbacks
    def test_a_chunk_ends_once_its_output_reaches_the_byte_budget(self):
        renderer = self.renderer(5)
        jobs = [("ok", 400)] * 10
        out = yield renderer.run_each(build, jobs, max_bytes=1000)
        self.assertEqual(len(out), 3)  # 400 + 400 < 1000 <= 1200
        rest = yield renderer.run_each(build, jobs[len(out) :], max_bytes=1000)
        self.assertEqual(len(rest), 3)

    @defer.inlineCallbacks
    def test_run_raises_the_jobs_own_failure(self):
        renderer = self.renderer(0.4)
        self.assertEqual((yield renderer.run(build, "ok", 2)), b"xx")
        yield self.assertFailure(renderer.run(build, "bad", 1), TemplateError)
        yield self.assertFailure(renderer.run(build, "spin", 0), RenderTimeout)
