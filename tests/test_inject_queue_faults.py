"""The injection API over a queue that cannot be written: a real twisted.web listener on loopback
and a real Maildir queue store whose file operations (given to its constructor) fail as a
read-only or forbidden queue directory would. The answer is a 503 with a JSON error, and nothing
half-written stays in the queue."""

from __future__ import annotations

import errno
import ipaddress
import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pymta.admin.http.inject import InjectAPI
from pymta.admin.http.jsonapi import JSONAPI, APISite
from pymta.admin.http.tokens import Token, TokenChecker, digest
from pymta.inbound.policy import RelayPolicy
from pymta.interfaces import QUEUE_STATES
from pymta.queue.store import MaildirQueueStore
from tests.fs_faults import RecordingOps, files_under, started_pool

TOKEN = "inject-token-0123456789abcdefghijklmno"


def _failing(op_name: str, code: int):
    def fail(index: int, op: str, path: str) -> BaseException | None:
        return OSError(code, os.strerror(code), path) if op == op_name else None

    return fail


class UnwritableQueueTests(unittest.TestCase):
    timeout = 60

    def _serve(self, fail=None) -> tuple[str, MaildirQueueStore, RecordingOps]:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        ops = RecordingOps(os.path.join(root, "queue"), fail)
        store = MaildirQueueStore(os.path.join(root, "queue"), reactor, started_pool(self), ops=ops)
        policy = RelayPolicy(["example.test"], None, [ipaddress.ip_network("127.0.0.0/8")], [], root)
        api = JSONAPI(TokenChecker([Token("crm", frozenset({"inject"}), digest(TOKEN))]))
        inject = InjectAPI(store, policy, reactor, reactor, "mx.example.test", 1 << 20)
        inject.register(api)
        self.addCleanup(inject.close)
        port = reactor.listenTCP(0, APISite(api, 1 << 20, reactor=reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/api/v1/inject", store, ops

    @defer.inlineCallbacks
    def _inject(self, url: str, n: int):
        import treq
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        body = {
            "envelope_sender": "news@example.org",
            "recipients": [{"email": f"r{i}@remote.example", "substitutions": {"n": i}} for i in range(n)],
            "content": {"from": "news@example.org", "subject": "n {{ n }}", "text_body": "hello {{ n }}"},
        }  # fmt: skip
        response = yield treq.post(url, json.dumps(body).encode(), pool=pool, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
        content = yield response.content()
        return response.code, response.headers.getRawHeaders("content-type"), json.loads(content)

    def _assert_refused(self, code: int, ctype: list[str], answer: dict, n: int, reason: str) -> None:
        self.assertEqual(code, 503, answer)
        self.assertTrue(ctype[0].startswith("application/json"))
        self.assertIn("the queue cannot be written", answer["error"])
        self.assertIn(reason, answer["error"])
        self.assertEqual((answer["success_count"], answer["fail_count"], answer["queue_ids"]), (0, n, []))
        self.assertEqual({f["reason"] for f in answer["failed_recipients"]}, {"4.3.0 could not queue the message"})
        self.assertEqual(len(answer["failed_recipients"]), n)

    @defer.inlineCallbacks
    def test_a_read_only_queue_answers_503_and_leaves_no_file_behind(self):
        # The temporary file is written and fsynced, then the rename into incoming/ fails (EROFS).
        url, store, ops = self._serve(_failing("rename", errno.EROFS))
        code, ctype, answer = yield self._inject(url, 40)
        self._assert_refused(code, ctype, answer, 40, os.strerror(errno.EROFS))
        # Files were written in tmp/ and fsynced; each refused rename was followed by its removal.
        renamed = [path for op, path in ops.calls if op == "rename"]
        self.assertTrue(renamed and all(path.startswith("tmp/") for path in renamed), ops.calls)
        self.assertTrue(all(("unlink", path) in ops.calls for path in renamed), ops.calls)
        self.assertIn("fsync", {op for op, _ in ops.calls})
        self.assertEqual(files_under(store.root), [])
        self.assertEqual([q for state in QUEUE_STATES for q in store.list(state)], [])

    @defer.inlineCallbacks
    def test_a_forbidden_queue_directory_answers_503(self):
        url, store, _ = self._serve(_failing("open", errno.EACCES))
        code, ctype, answer = yield self._inject(url, 5)
        self._assert_refused(code, ctype, answer, 5, os.strerror(errno.EACCES))
        self.assertEqual(files_under(store.root), [])

    @defer.inlineCallbacks
    def test_a_writable_queue_takes_the_same_request(self):
        url, store, _ = self._serve()
        code, _, answer = yield self._inject(url, 40)
        self.assertEqual((code, answer["success_count"], answer["fail_count"]), (200, 40, 0))
        self.assertEqual(sorted(store.list("incoming")), sorted(answer["queue_ids"]))
