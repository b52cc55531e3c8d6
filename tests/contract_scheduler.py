"""Behaviour every IScheduler must show: a mixin over a ``make_scheduler(clock)`` hook
(``clock`` a ``task.Clock``; the contract sets ``on_due`` as the queue manager does)."""

from __future__ import annotations

from twisted.internet import task
from zope.interface.verify import verifyObject

from pymta.interfaces import IScheduler


class SchedulerContract:
    """The IScheduler contract."""

    def make_scheduler(self, clock):
        raise NotImplementedError

    def scheduler(self):
        clock = task.Clock()
        clock.advance(1000)
        fired: list = []
        scheduler = self.make_scheduler(clock)
        scheduler.on_due = fired.append
        return scheduler, clock, fired

    def test_scheduler_provides_the_interface(self):
        self.assertTrue(verifyObject(IScheduler, self.scheduler()[0]))

    def test_keys_fire_once_in_time_order_when_due(self):
        scheduler, clock, fired = self.scheduler()
        scheduler.schedule("b", 1020)
        scheduler.schedule("a", 1010)
        self.assertEqual((len(scheduler), "a" in scheduler, scheduler.when("a")), (2, True, 1010))
        clock.advance(9)
        self.assertEqual(fired, [])
        clock.advance(11)
        self.assertEqual(fired, ["a", "b"])
        self.assertEqual((len(scheduler), "a" in scheduler, scheduler.when("a")), (0, False, None))
        clock.advance(100)
        self.assertEqual(fired, ["a", "b"])

    def test_a_new_schedule_replaces_the_old_one_and_cancel_forgets(self):
        scheduler, clock, fired = self.scheduler()
        scheduler.schedule("a", 1010)
        scheduler.schedule("a", 1030)
        scheduler.schedule("b", 1005)
        scheduler.cancel("b")
        scheduler.cancel("unknown")
        clock.advance(20)
        self.assertEqual(fired, [])
        clock.advance(10)
        self.assertEqual(fired, ["a"])

    def test_due_now_makes_every_key_due_and_stop_disarms(self):
        scheduler, clock, fired = self.scheduler()
        scheduler.schedule("a", 5000)
        scheduler.schedule("b", 6000)
        scheduler.due_now()
        clock.advance(0)
        self.assertEqual(sorted(fired), ["a", "b"])
        scheduler.schedule("c", 1001)
        scheduler.stop()
        clock.advance(10)
        self.assertEqual(sorted(fired), ["a", "b"])
        self.assertEqual(clock.getDelayedCalls(), [])
