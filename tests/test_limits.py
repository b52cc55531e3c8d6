"""Rates, per-client limits and greylisting on task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet import task

from pymta.inbound.limits import ClientLimits, Greylist, client_key
from pymta.rate import KeyedLimiter, Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1, 1)),
        ("60/min", Rate(60, 60, 1)),
        ("5000/day", Rate(5000, 86400, 1)),
        ("600/min, burst=20", Rate(600, 60, 20)),
        ("2/h", Rate(2, 3600, 1)),
    ],
)
def test_rates_parse(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0/s", "10/fortnight", "10/s, burst=0", 10, "10/s burst=2"])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_gcra_allows_the_burst_then_the_steady_rate():
    clock = task.Clock()
    limiter = KeyedLimiter(parse_rate("60/min, burst=3"), clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("k")
    assert wait == pytest.approx(1.0)
    assert limiter.take("other") == 0.0  # keys are independent
    clock.advance(1.0)
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0


def test_connections_per_client_are_counted_and_released():
    limits = ClientLimits(task.Clock(), connections_per_client=2)
    assert limits.connected("192.0.2.1") is None
    assert limits.connected("192.0.2.1") is None
    reply = limits.connected("192.0.2.1")
    assert (reply.code, reply.enhanced) == (421, "4.7.0")
    limits.disconnected("192.0.2.1")
    limits.disconnected("192.0.2.1")
    assert limits.connected("192.0.2.2") is None
    limits.disconnected("192.0.2.1")
    assert limits.connected("192.0.2.1") is None


def test_message_and_recipient_rates_answer_450_471_until_time_passes():
    clock = task.Clock()
    limits = ClientLimits(clock, message_rate=parse_rate("2/min"), recipient_rate=parse_rate("1/s"))
    assert limits.message("192.0.2.1") is None
    reply = limits.message("192.0.2.1")
    assert (reply.code, reply.enhanced) == (450, "4.7.1")
    assert limits.recipient("2001:db8::1") is None
    assert limits.recipient("2001:db8::2").code == 450  # same /64
    clock.advance(30)
    assert limits.message("192.0.2.1") is None


def test_greylisting_passes_a_correct_retry_and_remembers_it():
    clock = task.Clock()
    grey = Greylist(clock, delay=300, expire=4 * 3600, lifetime=36 * 86400)
    first = grey.check("192.0.2.10", "a@x.test", "b@y.test")
    assert (first.code, first.enhanced) == (450, "4.7.1")
    clock.advance(60)
    assert grey.check("192.0.2.10", "a@x.test", "b@y.test").code == 450  # too early
    clock.advance(300)
    assert grey.check("192.0.2.99", "A@X.test", "b@y.test") is None  # same /24, case-insensitive
    assert grey.check("192.0.2.10", "other@x.test", "b@y.test").code == 450  # another triple
    clock.advance(30 * 86400)
    assert grey.check("192.0.2.10", "a@x.test", "b@y.test") is None  # still known


def test_greylist_entry_that_never_retried_in_time_starts_again():
    clock = task.Clock()
    grey = Greylist(clock, delay=300, expire=3600, lifetime=86400)
    grey.check("192.0.2.10", "a@x.test", "b@y.test")
    clock.advance(7200)
    assert grey.check("192.0.2.10", "a@x.test", "b@y.test").code == 450


def test_client_keys():
    assert client_key("192.0.2.1") == "192.0.2.1/32"
    assert client_key("::ffff:192.0.2.1", v4_prefix=24) == "192.0.2.0/24"
    assert client_key("2001:db8::1") == "2001:db8::/64"
