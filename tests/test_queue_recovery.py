"""Recovery of a large queue does not hold the reactor: the store reads it in batches in its thread
pool, the queue manager schedules each batch as it comes, and every message is recovered once."""

from __future__ import annotations

import os
import random
import shutil
import socket
import time
from datetime import datetime

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bench.queue_fill import fill
from pymta.envelope import ROUTE_LOCAL, ROUTE_RELAY
from pymta.interfaces import CORRUPT, DEFERRED, HOLD, INCOMING
from pymta.queue.manager import QueueManager
from pymta.queue.store import MaildirQueueStore
from tests.fakes import ScriptedDeliveryAgent
from tests.fs_faults import started_pool
from tests.mta_process import MTAProcess, wait_until


def _scratch(test: unittest.TestCase) -> str:
    path = test.mktemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


class IncrementalRecoveryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_batches_come_between_reactor_turns_and_hold_every_message_once(self):
        root = os.path.join(_scratch(self), "queue")
        deferred = fill(root, 600, 512, 3600)
        incoming = fill(root, 40, 512, 0, state=INCOMING)
        held = fill(root, 5, 512, 0, state=HOLD)
        with open(os.path.join(root, INCOMING, "0000000000000000BAD"), "wb") as f:
            f.write(b"not a queue file")
        store = MaildirQueueStore(root, reactor, started_pool(self))
        turns: list[int] = [0]
        seen_at: list[int] = []  # reactor turns counted when each batch came

        def tick() -> None:
            turns[0] += 1
            if not done.called:
                reactor.callLater(0, tick)

        batches: list[list[tuple[str, str, float, float]]] = []

        def on_batch(batch):
            seen_at.append(turns[0])
            batches.append(batch)

        done = store.recover_incrementally(on_batch)
        reactor.callLater(0, tick)
        counts = yield done
        recovered = [entry for batch in batches for entry in batch]
        qids = [qid for qid, _, _, _ in recovered]
        self.assertEqual(len(qids), len(set(qids)))  # none twice
        self.assertEqual(sorted(qids), sorted(deferred + incoming + held))
        self.assertEqual({qid: state for qid, state, _, _ in recovered},
                         {**dict.fromkeys(deferred, DEFERRED), **dict.fromkeys(incoming, INCOMING),
                          **dict.fromkeys(held, HOLD)})  # fmt: skip
        self.assertTrue(all(due > time.time() + 3000 for qid, state, due, _ in recovered if state == DEFERRED))
        self.assertEqual((counts["queued"], counts["corrupt"], counts["quarantined"]), (645, 1, 1))
        self.assertEqual(store.list(CORRUPT), ["0000000000000000BAD"])
        # incoming/ first, then the hashed deferred/ directories one by one, hold/ last
        self.assertEqual({state for _, state, _, _ in batches[0]}, {INCOMING})
        self.assertGreater(len(batches), 100)
        self.assertGreater(seen_at[-1], seen_at[0])  # the reactor turned while the queue was read

    @defer.inlineCallbacks
    def test_a_message_announced_during_recovery_is_delivered_once(self):
        root = os.path.join(_scratch(self), "queue")
        qids = fill(root, 30, 512, 0, state=INCOMING, recipient="rcpt{n}@remote.example")
        fill(root, 300, 512, 3600)
        store = MaildirQueueStore(root, reactor, started_pool(self))
        agent = ScriptedDeliveryAgent()
        clock = task.Clock()
        clock.advance(time.time())
        manager = QueueManager(store, {ROUTE_RELAY: agent, ROUTE_LOCAL: agent}, clock, "mx.example.test",
                               rng=random.Random(3), wall=clock)  # fmt: skip
        manager.startService()
        self.addCleanup(manager.stopService)
        for qid in qids:  # what the incoming/ watcher does when it sees them (a second announcement)
            manager.notify_incoming(qid)
        yield manager.recovering
        deadline = time.monotonic() + 60
        while len(agent.calls) < len(qids) and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield task.deferLater(reactor, 0.2, lambda: None)  # room for a second delivery, should one come
        self.assertEqual(sorted(call[0] for call in agent.calls), sorted(qids))
        self.assertEqual(len(manager.scheduler), 300)  # the deferred ones wait for their time


def _log_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


@pytest.mark.timeout(900)
def test_listener_greets_while_twenty_thousand_messages_are_recovered(tmp_path):
    mta = MTAProcess(str(tmp_path))
    root = os.path.join(mta.state_dir, "queue")
    fill(root, 20_000, 512, 72_000)
    mine = fill(root, 20, 512, 0, state=INCOMING, recipient="alice@example.test", route=ROUTE_LOCAL)
    mta.start()
    try:
        with socket.create_connection(("127.0.0.1", mta.port), timeout=30) as s:
            s.settimeout(30)
            greeting = s.recv(512)
            greeted_at = time.time()
            assert greeting.startswith(b"220 ")
            s.sendall(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            deadline = time.monotonic() + 30
            replies = b""
            while replies.count(b"\r\n354 ") + replies.startswith(b"354 ") == 0 and time.monotonic() < deadline:
                replies += s.recv(4096)
            s.sendall(b"Subject: during recovery\r\n\r\nhello\r\n.\r\n")
            while b"250 2.0.0" not in replies.rpartition(b"354 ")[2] and time.monotonic() < deadline:
                replies += s.recv(4096)
            assert b"250 2.0.0" in replies.rpartition(b"354 ")[2]
        done = wait_until(lambda: [e for e in mta.log_events() if e.get("event") == "queue_recovered"], 120,
                          "the end of recovery")  # fmt: skip
        # The listener answered before the queue was read (the log's clock is the same as ours).
        assert greeted_at < _log_time(done[0])
        assert done[0]["queued"] >= 20_020
        assert len(done) == 1
        # The twenty new messages queued before the start and the one sent during recovery arrive once each.
        during = [e["qid"] for e in mta.log_events() if e.get("event") == "queued" and e.get("listener") != "http"
                  and "alice@example.test" in (e.get("recipients") or [])]  # fmt: skip
        assert len(during) == 1
        ours = {*mine, *during}

        def settled() -> bool:  # every one of them delivered and gone from the queue: nothing more can arrive
            left = {q for state in ("incoming", "active", "deferred") for q in mta.queue_files(state)} & ours
            return not left and len(mta.maildir_messages("alice@example.test")) >= 21

        wait_until(settled, 60, "local deliveries")
        messages = mta.maildir_messages("alice@example.test")
        assert len(messages) == 21
        assert sum(b"during recovery" in m for m in messages) == 1
        assert len(mine) == 20
    finally:
        mta.stop()
