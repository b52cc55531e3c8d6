"""Traffic shaping: destinations, limits, pushback backoff; held mail does not use attempts."""

from __future__ import annotations

import re

import pytest
from twisted.internet import task

from pymta.config import ConfigError, build_config
from pymta.envelope import ROUTE_RELAY, Envelope, Recipient, new_qid
from pymta.outbound.shaping import BackoffRule, Limits, Shaper
from pymta.queue.manager import QueueManager
from pymta.queue.store import MemoryQueueStore
from pymta.rate import parse_rate
from tests.fakes import ScriptedDeliveryAgent, deferred


def shaper(clock, **kw) -> Shaper:
    return Shaper(
        clock,
        Limits(connections=10, message_rate=parse_rate("100/s")),
        {"remote.test": Limits(connections=2, message_rate=parse_rate("60/min"), messages_per_connection=50)},
        {"google": (("google.com",), Limits(connections=20))},
        **kw,
    )


def test_destinations_roll_up_by_provider_mx_suffix_and_limits_cascade():
    s = shaper(task.Clock())
    key, limits = s.destination("Gmail.example", ("alt1.aspmx.l.google.com",))
    assert key == "provider:google"
    assert limits.connections == 20
    assert limits.message_rate == parse_rate("100/s")
    key, limits = s.destination("remote.test", ("mx.remote.test",))
    assert key == "domain:remote.test"
    assert limits.connections == 2
    assert limits.messages_per_connection == 50
    assert s.destination("other.test", ("mx.other.test",))[1].connections == 10


def test_rate_limit_holds_without_sending():
    clock = task.Clock()
    s = shaper(clock)
    key, limits = s.destination("remote.test")
    assert s.hold_until(key, limits) == 0.0
    hold = s.hold_until(key, limits)
    assert hold == pytest.approx(clock.seconds() + 1.0)
    clock.advance(1.0)
    assert s.hold_until(key, limits) == 0.0


def test_pushback_pauses_then_ramps_back_up():
    clock = task.Clock()
    s = shaper(clock, backoff=(BackoffRule(re.compile("slow down", re.I), 600, 0.5, 3600),))
    key, limits = s.destination("remote.test")
    assert s.observe(key, 421, "4.7.0", "Slow down please")
    assert s.hold_until(key, limits) == pytest.approx(600)
    assert s.explain(key)["reason"].startswith("421 4.7.0")
    clock.advance(600)
    assert s.current_rate(key, limits).count == pytest.approx(30)  # 50% of 60/min
    clock.advance(1800)
    assert s.current_rate(key, limits).count == pytest.approx(45)
    clock.advance(1800)
    assert s.current_rate(key, limits).count == pytest.approx(60)


def test_shipped_rules_recognise_common_pushback_and_ignore_other_replies():
    s = shaper(task.Clock())
    key, _ = s.destination("gmail.example", ("mx.google.com",))
    assert not s.observe(key, 550, "5.1.1", "user unknown")
    assert not s.observe(key, 450, "4.2.0", "mailbox busy")
    assert s.observe(key, 421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail")


def test_connection_slots_are_fifo():
    s = shaper(task.Clock())
    key, limits = s.destination("remote.test")
    first, second, third = (s.acquire_connection(key, limits) for _ in range(3))
    assert first.called
    assert second.called
    assert not third.called
    s.release_connection(key)
    assert third.called


def test_held_mail_waits_without_using_an_attempt():
    clock = task.Clock()
    clock.advance(1000)

    holding = ScriptedDeliveryAgent({"a@remote.test": [deferred(451, "4.7.0", "held", {"hold_until": 1300.0})]})
    store = MemoryQueueStore()
    manager = QueueManager(store, {ROUTE_RELAY: holding}, clock, "h")
    manager.startService()
    qid = new_qid()
    store.enqueue(Envelope(qid=qid, sender="s@x.test", recipients=[Recipient("a@remote.test")], arrival=1000), b"x")
    manager.notify_incoming(qid)
    envelope = store.load(qid)
    assert envelope.attempts == 0
    assert envelope.recipients[0].attempts == 0
    assert envelope.next_attempt == 1300.0


def test_shaping_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"shaping\.provider\.x\.mx_suffix"):
        build_config({"shaping": {"provider": {"x": {"connections": 1}}}}, "t.toml")
    with pytest.raises(ConfigError, match=r"shaping\.backoff\[1\]\.rate"):
        build_config({"shaping": {"backoff": [{"match": "x", "rate": "0%"}]}}, "t.toml")
    with pytest.raises(ConfigError, match=r"shaping\.speed"):
        build_config({"shaping": {"speed": {}}}, "t.toml")


def test_concurrency_starts_low_grows_on_success_and_halves_on_congestion():
    s = shaper(task.Clock())
    key, limits = s.destination("other.test")  # cap 10
    slots = [s.acquire_connection(key, limits) for _ in range(4)]
    assert [d.called for d in slots] == [True, True, False, False]  # slow start: 2
    s.success(key)
    assert slots[2].called
    assert not slots[3].called
    for _ in range(20):
        s.success(key)
    assert slots[3].called
    assert s.state(key).window == 10
    s.congestion(key, "421 4.7.0 busy")
    assert s.state(key).window == 5


def test_a_dead_site_is_suspended_after_failures_in_a_row():
    clock = task.Clock()
    s = shaper(clock)
    key, limits = s.destination("dead.test")
    for _ in range(4):
        s.connection_failed(key, "connection refused")
    assert s.hold_until(key, limits) == 0.0
    s.connection_failed(key, "connection refused")
    assert s.hold_until(key, limits) == pytest.approx(600.0)
    assert s.explain(key)["reason"].startswith("dead site: 5 connection failures")


def test_domains_on_the_same_mx_hosts_share_a_destination():
    s = shaper(task.Clock())
    a = s.destination("one.example", ("mx2.host.example", "mx1.host.example"))
    b = s.destination("two.example", ("mx1.host.example", "mx2.host.example"))
    assert a[0] == b[0] == "mx:mx1.host.example,mx2.host.example"
    assert s.destination("remote.test", ("mx1.host.example",))[0] == "domain:remote.test"  # own limits win


@pytest.mark.parametrize(
    ("utc", "window", "tz", "opens"),
    [
        ("2026-11-24T12:00", "08:00-20:00", "UTC", None),
        ("2026-11-24T21:00", "08:00-20:00", "UTC", "2026-11-25T08:00"),
        ("2026-11-24T05:00", "08:00-20:00", "UTC", "2026-11-24T08:00"),
        ("2026-11-24T06:30", "08:00-20:00", "Europe/Berlin", "2026-11-24T07:00"),  # 08:00 CET = 07:00 UTC
        ("2026-11-24T23:00", "22:00-06:00", "UTC", None),
        ("2026-11-24T12:00", "22:00-06:00", "UTC", "2026-11-24T22:00"),
    ],
)
def test_delivery_windows_hold_mail_until_they_open(utc, window, tz, opens):
    import datetime

    from pymta.rate import parse_window

    clock = task.Clock()
    clock.advance(datetime.datetime.fromisoformat(utc).replace(tzinfo=datetime.UTC).timestamp())
    s = Shaper(clock, Limits(window=parse_window(window), timezone=tz))
    key, limits = s.destination("x.test")
    expected = 0.0 if opens is None else datetime.datetime.fromisoformat(opens).replace(tzinfo=datetime.UTC).timestamp()
    assert s.hold_until(key, limits) == expected


def test_window_and_timezone_config_errors():
    with pytest.raises(ConfigError, match=r"shaping\.domain\.x\.window"):
        build_config({"shaping": {"domain": {"x": {"window": "8-20"}}}}, "t")
    with pytest.raises(ConfigError, match=r"shaping\.default\.timezone: unknown time zone"):
        build_config({"shaping": {"default": {"timezone": "Mars/Olympus"}}}, "t")


def test_connection_rate_spaces_new_connections():
    clock = task.Clock()
    s = Shaper(clock, Limits(connection_rate=parse_rate("2/s")))
    key, limits = s.destination("x.test")
    assert s.connection_wait(key, limits) == 0.0
    assert s.connection_wait(key, limits) == pytest.approx(0.5)
    assert s.destination("y.test")[1].connection_rate == parse_rate("2/s")


def test_a_destinations_retry_schedule_overrides_the_queue_default():
    clock = task.Clock()
    clock.advance(1000)

    deferring = ScriptedDeliveryAgent({"a@remote.test": [deferred(451, "4.4.1", "later", {"retry": [60.0, 120.0]})]})
    store = MemoryQueueStore()
    manager = QueueManager(store, {ROUTE_RELAY: deferring}, clock, "h", retry_initial=600, retry_max=3600)
    manager.startService()
    qid = new_qid()
    store.enqueue(Envelope(qid=qid, sender="s@x.test", recipients=[Recipient("a@remote.test")], arrival=1000), b"x")
    manager.notify_incoming(qid)
    assert 50 <= store.load(qid).next_attempt - 1000 <= 70
