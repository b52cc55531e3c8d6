"""Every TLS decision is explained: the policy source and what failed reach the envelope, so that
``pymta-queue show ID`` (and the listing) say why a message waits."""

from __future__ import annotations

import io

from twisted.internet import defer, task

from pymta.admin.cli import print_list
from pymta.admin.queue_ops import show_message
from pymta.envelope import DEFERRED, ROUTE_RELAY, Envelope, Recipient, new_qid
from pymta.queue.manager import QueueManager
from pymta.queue.store import MemoryQueueStore
from tests.fakes import ScriptedDeliveryAgent


class Labelled(ScriptedDeliveryAgent):
    def deliver(self, envelope, recipients, body):
        d: defer.Deferred = super().deliver(envelope, recipients, body)

        def label(results):
            for r in results:
                r.extra.update(tls_policy="dane", tls_failure="validation-failure")
            return results

        return d.addCallback(label)


def test_a_waiting_message_shows_its_tls_policy_and_failure():
    clock = task.Clock()
    clock.advance(1_700_000_000)
    text = "mx.far.test [192.0.2.1]: validation-failure: the certificate matches no TLSA record"
    agent = Labelled({"r@far.test": [(DEFERRED, 451, "4.7.5", text)]})
    store = MemoryQueueStore()
    manager = QueueManager(store, {ROUTE_RELAY: agent}, clock, "mx.test", route_for=lambda a: ROUTE_RELAY)
    manager.startService()
    env = Envelope(qid=new_qid(), sender="s@a.test", arrival=clock.seconds(),
                   recipients=[Recipient("r@far.test", route=ROUTE_RELAY)])  # fmt: skip
    store.enqueue(env, b"Subject: x\r\n\r\nx\r\n")
    manager.notify_incoming(env.qid)
    clock.advance(1)
    shown = show_message(store, env.qid)
    reply = shown["recipients"][0]["reply"]
    assert (reply["enhanced"], reply["tls_policy"], reply["tls_failure"]) == ("4.7.5", "dane", "validation-failure")
    out = io.StringIO()
    print_list([shown], out)
    assert "[tls_policy dane, validation-failure]" in out.getvalue()
