"""Behaviour every IInboundState must show: a mixin over a ``make_state(clock)`` hook.

Mix it into a pytest class whose ``make_state(clock)`` returns a fresh, empty state on that
clock. A backend shared between processes also passes :class:`SharedInboundStateContract`,
whose ``other_process(clock)`` returns a second handle on the same state as another process
would hold it.
"""

from __future__ import annotations

import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from pymta.interfaces import IInboundState
from pymta.rate import parse_rate

TRIPLE = ("192.0.2.0/24", "a@x.test", "b@y.test")


class InboundStateContract:
    def make_state(self, clock):
        raise NotImplementedError

    @pytest.fixture
    def clock(self):
        clock = task.Clock()
        clock.advance(1_700_000_000)  # wall-clock-like times, as the reactor gives
        return clock

    def test_state_provides_the_interface(self, clock):
        assert verifyObject(IInboundState, self.make_state(clock))

    def test_connections_are_counted_up_to_the_limit_and_released(self, clock):
        state = self.make_state(clock)
        assert [state.acquire_connection("192.0.2.1/32", 2) for _ in range(3)] == [True, True, False]
        assert state.acquire_connection("192.0.2.2/32", 2) is True  # keys are independent
        state.release_connection("192.0.2.1/32")
        assert state.acquire_connection("192.0.2.1/32", 2) is True
        assert state.acquire_connection("192.0.2.1/32", 2) is False

    def test_releasing_more_than_was_counted_does_not_go_below_zero(self, clock):
        state = self.make_state(clock)
        state.release_connection("k")
        state.release_connection("k")
        assert [state.acquire_connection("k", 1), state.acquire_connection("k", 1)] == [True, False]

    def test_clearing_connections_forgets_every_count(self, clock):
        state = self.make_state(clock)
        assert state.acquire_connection("k", 1)
        state.clear_connections()
        assert state.acquire_connection("k", 1)

    def test_rates_allow_the_burst_then_the_steady_rate_per_name_and_key(self, clock):
        state = self.make_state(clock)
        rate = parse_rate("60/min, burst=3")
        assert [state.take("messages", "k", rate) for _ in range(3)] == [0.0, 0.0, 0.0]
        assert state.take("messages", "k", rate) == pytest.approx(1.0)
        assert state.take("recipients", "k", rate) == 0.0  # another limit
        assert state.take("messages", "other", rate) == 0.0  # another client
        clock.advance(1.0)
        assert state.take("messages", "k", rate) == 0.0
        assert state.take("messages", "k", rate) > 0

    def test_a_refused_event_is_not_counted(self, clock):
        state = self.make_state(clock)
        rate = parse_rate("1/s")
        assert state.take("messages", "k", rate) == 0.0
        for _ in range(5):
            assert state.take("messages", "k", rate) == pytest.approx(1.0)
        clock.advance(1.0)
        assert state.take("messages", "k", rate) == 0.0

    def test_greylisting_holds_a_new_triple_for_the_delay_then_remembers_it(self, clock):
        state = self.make_state(clock)
        assert state.greylist(TRIPLE, 300, 4 * 3600, 36 * 86400) == pytest.approx(300)
        clock.advance(60)
        assert state.greylist(TRIPLE, 300, 4 * 3600, 36 * 86400) == pytest.approx(240)  # counts from the first try
        clock.advance(240)
        assert state.greylist(TRIPLE, 300, 4 * 3600, 36 * 86400) == 0.0
        clock.advance(30 * 86400)
        assert state.greylist(TRIPLE, 300, 4 * 3600, 36 * 86400) == 0.0  # renewed on every pass
        assert state.greylist((TRIPLE[0], "other@x.test", TRIPLE[2]), 300, 4 * 3600, 36 * 86400) > 0

    def test_an_unretried_triple_expires_and_starts_again(self, clock):
        state = self.make_state(clock)
        state.greylist(TRIPLE, 300, 3600, 86400)
        clock.advance(3601)
        assert state.greylist(TRIPLE, 300, 3600, 86400) == pytest.approx(300)

    def test_a_passed_triple_lapses_after_its_lifetime(self, clock):
        state = self.make_state(clock)
        state.greylist(TRIPLE, 0, 3600, 86400)
        clock.advance(86401)
        assert state.greylist(TRIPLE, 300, 3600, 86400) == pytest.approx(300)


class SharedInboundStateContract(InboundStateContract):
    """What a backend shared by the listener processes adds: one view for all of them."""

    def other_process(self, clock):
        raise NotImplementedError

    def test_another_process_sees_the_same_counts_and_triples(self, clock):
        one, two = self.make_state(clock), self.other_process(clock)
        assert one.acquire_connection("k", 2)
        assert two.acquire_connection("k", 2)
        assert not one.acquire_connection("k", 2)
        assert not two.acquire_connection("k", 2)
        rate = parse_rate("1/min")
        assert one.take("messages", "k", rate) == 0.0
        assert two.take("messages", "k", rate) > 0
        one.greylist(TRIPLE, 300, 3600, 86400)
        clock.advance(300)
        assert two.greylist(TRIPLE, 300, 3600, 86400) == 0.0

    def test_the_connections_of_an_ended_process_are_released(self, clock):
        one, two = self.make_state(clock), self.other_process(clock)
        assert two.acquire_connection("k", 1)
        assert not one.acquire_connection("k", 1)
        one.release_owner(two.owner)
        assert one.acquire_connection("k", 1)
