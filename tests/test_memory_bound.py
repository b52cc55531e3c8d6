"""Memory per message: a 30 MB message over real TCP on loopback makes the SMTP server hold a bounded
multiple of its size (measured with tracemalloc in this process; the client is another process)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tracemalloc

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pymta.smtp.server import ServerLimits, SMTPServerFactory
from tests.test_smtp_pressure import CLIENT
from tests.test_smtp_server import FakeDelegate

SIZE = 30 * 1024 * 1024
HEAD = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n"


@pytest.mark.timeout(300)
class LargeMessageMemoryTests(unittest.TestCase):
    timeout = 280

    @defer.inlineCallbacks
    def test_a_30_mb_message_is_held_at_most_about_twice(self):
        delegate = FakeDelegate()
        factory = SMTPServerFactory(delegate, "mx.example.test", ServerLimits(max_message_size=SIZE + 1024 * 1024), reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        tmp = tempfile.mkdtemp()
        head_file = os.path.join(tmp, "head")
        with open(head_file, "wb") as f:
            f.write(HEAD)
        out = open(os.path.join(tmp, "out"), "wb")  # noqa: SIM115 (kept open beyond this block)
        self.addCleanup(out.close)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        line = r"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(port.getHost().port), head_file, str(SIZE), line,
                                 "go", "plain"], stdout=out, stderr=subprocess.PIPE)  # fmt: skip
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        for _ in range(4000):  # at most about 200 s
            if proc.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertIsNotNone(proc.returncode, "the client did not finish")
        _, peak = tracemalloc.get_traced_memory()
        with open(os.path.join(tmp, "out"), "rb") as f:
            replies = f.read()
        self.assertIn(b"250 2.0.0", replies)
        self.assertEqual(len(delegate.messages), 1)
        held = len(delegate.messages[0][2])
        self.assertGreaterEqual(held, SIZE)
        # The message itself (kept by the delegate, as the queue write does) plus one working copy
        # while it is joined and un-stuffed, plus bounded input buffers: never a copy per line.
        self.assertLess(peak, 2 * held + 8 * 1024 * 1024, peak)
