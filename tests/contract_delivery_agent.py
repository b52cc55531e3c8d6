"""Behaviour every IDeliveryAgent must show: a mixin over a ``make_agent()`` hook returning an
agent that delivers the recipients of ``deliverable_envelope()`` (the hook may override it)."""

from __future__ import annotations

from twisted.internet import defer
from zope.interface.verify import verifyObject

from pymta.envelope import DEFERRED, DELIVERED, FAILED, Envelope, Recipient, new_qid
from pymta.interfaces import IDeliveryAgent

BODY = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class DeliveryAgentContract:
    """The IDeliveryAgent contract."""

    route = "relay"

    def make_agent(self):
        raise NotImplementedError

    def deliverable_envelope(self) -> Envelope:
        rcpts = [Recipient(a, route=self.route) for a in ("bob@example.test", "carol@example.test", "dave@example.test")]
        return Envelope(new_qid(), "a@example.org", rcpts, size=len(BODY))

    def test_agent_provides_the_interface(self):
        self.assertTrue(verifyObject(IDeliveryAgent, self.make_agent()))

    @defer.inlineCallbacks
    def test_one_result_per_recipient_in_order(self):
        env = self.deliverable_envelope()
        results = yield self.make_agent().deliver(env, env.recipients, BODY)
        self.assertEqual([r.address for r in results], [r.address for r in env.recipients])
        self.assertEqual({r.status for r in results}, {DELIVERED})
        for r in results:
            self.assertEqual((r.code // 100, r.enhanced[:2]), (2, "2."))

    @defer.inlineCallbacks
    def test_a_batch_of_some_recipients_answers_for_those_only(self):
        env = self.deliverable_envelope()
        batch = env.recipients[1:]
        results = yield self.make_agent().deliver(env, batch, BODY)
        self.assertEqual([r.address for r in results], [r.address for r in batch])
        self.assertTrue(all(r.status in (DELIVERED, DEFERRED, FAILED) for r in results))
