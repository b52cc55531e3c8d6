"""Behaviour every ISuppressionList must show: a mixin over a ``make_list(clock)`` hook
(``clock`` a ``task.Clock``; soft bounces suppress at the third within a week, for 30 days)."""

from __future__ import annotations

from twisted.internet import task
from zope.interface.verify import verifyObject

from pymta.interfaces import ISuppressionList


class SuppressionListContract:
    """The ISuppressionList contract."""

    def make_list(self, clock):
        raise NotImplementedError

    def suppression(self):
        clock = task.Clock()
        clock.advance(1_000_000)
        return self.make_list(clock), clock

    def test_list_provides_the_interface(self):
        self.assertTrue(verifyObject(ISuppressionList, self.suppression()[0]))

    def test_added_addresses_are_suppressed_case_blind_until_removed(self):
        store, _ = self.suppression()
        self.assertIsNone(store.is_suppressed("bob@example.test"))
        entry = store.add("Bob@Example.Test", "asked", "manual")
        self.assertEqual((entry["address"], entry["reason"], entry["source"]), ("bob@example.test", "asked", "manual"))
        self.assertEqual(store.is_suppressed("BOB@example.test")["reason"], "asked")
        self.assertEqual(store.count(), 1)
        self.assertTrue(store.remove("bob@example.test"))
        self.assertFalse(store.remove("bob@example.test"))
        self.assertIsNone(store.is_suppressed("bob@example.test"))

    def test_a_scoped_suppression_holds_for_its_sender_domain_only(self):
        store, _ = self.suppression()
        store.add("bob@example.test", "unsubscribed", "unsubscribe", scope="news.test")
        self.assertIsNotNone(store.is_suppressed("bob@example.test", "news.test"))
        self.assertIsNone(store.is_suppressed("bob@example.test", "shop.test"))
        self.assertIsNone(store.is_suppressed("bob@example.test"))

    def test_an_expired_suppression_lapses(self):
        store, clock = self.suppression()
        store.add("bob@example.test", "for a while", "manual", expires=clock.seconds() + 60)
        self.assertIsNotNone(store.is_suppressed("bob@example.test"))
        clock.advance(61)
        self.assertIsNone(store.is_suppressed("bob@example.test"))

    def test_hard_bounces_and_complaints_suppress_at_once_soft_bounces_past_a_threshold(self):
        store, _ = self.suppression()
        self.assertEqual(store.record_bounce("hard@example.test", "5.1.1 no such user", True)["source"], "bounce")
        self.assertEqual(store.record_complaint("angry@example.test")["source"], "complaint")
        self.assertIsNone(store.record_bounce("soft@example.test", "4.2.2 full", False))
        self.assertIsNone(store.record_bounce("soft@example.test", "4.2.2 full", False))
        self.assertIsNotNone(store.record_bounce("soft@example.test", "4.2.2 full", False))
        self.assertEqual({a: store.is_suppressed(f"{a}@example.test")["source"] for a in ("hard", "angry", "soft")},
                         {"hard": "bounce", "angry": "complaint", "soft": "bounce"})  # fmt: skip
