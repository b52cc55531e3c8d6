"""Source IP pools and warm-up ladders."""

from __future__ import annotations

import datetime
import random

import pytest
from twisted.internet import task

from pymta.config import ConfigError, build_config
from pymta.envelope import Envelope, Recipient, new_qid
from pymta.outbound.pools import Pool, Source, SourceSelector, WarmupCounter

DAY0 = datetime.date(2026, 11, 20)


def clock_at(day: datetime.date) -> task.Clock:
    clock = task.Clock()
    clock.advance(datetime.datetime.combine(day, datetime.time(12), datetime.UTC).timestamp())
    return clock


def envelope(sender="a@news.example", user=None, pool=None, source=None) -> Envelope:
    extra = {k: v for k, v in (("pool", pool), ("source", source)) if v}
    return Envelope(qid=new_qid(), sender=sender, recipients=[Recipient("r@x.test")], auth_user=user, extra=extra)


@pytest.fixture
def world(tmp_path):
    ip1 = Source("ip1", "127.0.0.2", "mta1.example.test", (2, 4), DAY0)
    ip2 = Source("ip2", "127.0.0.3", "mta2.example.test")
    pools = {"bulk": Pool("bulk", [(ip1, 1), (ip2, 3)]), "warm": Pool("warm", [(ip1, 1)]),
             "spilling": Pool("spilling", [(ip1, 1), (ip2, 1)], spill=True)}  # fmt: skip
    counter = WarmupCounter(str(tmp_path / "w.sqlite"))
    yield ip1, ip2, pools, counter, str(tmp_path / "w.sqlite")
    counter.close()


def test_pool_choice_by_header_user_sender_domain_then_default(world):
    _ip1, _ip2, pools, counter, _ = world
    sel = SourceSelector(clock_at(DAY0), pools, {"news.example": "warm"}, {"app": "bulk"}, "bulk", counter)
    assert sel.pool_for(envelope(pool="warm")).name == "warm"
    assert sel.pool_for(envelope(user="app")).name == "bulk"
    assert sel.pool_for(envelope()).name == "warm"
    assert sel.pool_for(envelope(sender="b@other.example")).name == "bulk"
    assert sel.pool_for(envelope(pool="nonexistent", sender="b@other.example")).name == "bulk"


def test_weights_spread_mail_across_sources(world):
    _ip1, _ip2, pools, counter, _ = world
    sel = SourceSelector(clock_at(DAY0 + datetime.timedelta(days=10)), pools, default_pool="bulk", counter=counter,
                         rng=random.Random(4))  # fmt: skip
    picks = [sel.pick(envelope(sender="x@y.example"))[0].name for _ in range(400)]
    assert 60 < picks.count("ip1") < 140  # weight 1 of 4


def test_the_daily_cap_of_the_ladder_holds_and_survives_a_restart(world):
    ip1, _ip2, pools, counter, path = world
    clock = clock_at(DAY0)
    sel = SourceSelector(clock, pools, default_pool="warm", counter=counter)
    for _ in range(2):
        source, _ = sel.pick(envelope())
        sel.sent(source)
    source, until = sel.pick(envelope())
    assert source is None
    assert until == datetime.datetime.combine(DAY0 + datetime.timedelta(days=1), datetime.time(), datetime.UTC).timestamp()
    again = SourceSelector(clock, pools, default_pool="warm", counter=WarmupCounter(path))  # a restart
    assert again.pick(envelope())[0] is None
    clock.advance(86400)  # day 2: the ladder allows 4
    assert again.pick(envelope())[0] is ip1
    clock.advance(86400 * 5)  # past the ladder: no cap
    assert all(again.pick(envelope())[0] is ip1 for _ in range(10))


def test_mail_over_the_cap_spills_only_where_configured(world):
    _ip1, ip2, pools, counter, _ = world
    sel = SourceSelector(clock_at(DAY0), pools, counter=counter)
    counter.add("ip1", DAY0, 2)
    assert sel.pick(envelope(pool="spilling", source="ip1"))[0] is ip2
    assert sel.pick(envelope(pool="bulk", source="ip1"))[0] is None


def test_a_source_that_cannot_bind_leaves_the_pool(world):
    ip1, ip2, pools, counter, _ = world
    sel = SourceSelector(clock_at(DAY0 + datetime.timedelta(days=9)), pools, counter=counter)
    sel.unusable(ip2, "cannot bind 127.0.0.3")
    assert all(sel.pick(envelope(pool="bulk"))[0] is ip1 for _ in range(20))
    assert ip2.why_unusable == "cannot bind 127.0.0.3"


def test_pool_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"pools\.bulk\.sources: no source named 'ipX'"):
        build_config({"sources": {"ip1": {"address": "127.0.0.2"}}, "pools": {"bulk": {"sources": {"ipX": 1}}}}, "t")
    with pytest.raises(ConfigError, match=r"sources\.ip1\.address"):
        build_config({"sources": {"ip1": {"address": "nowhere"}}}, "t")
    with pytest.raises(ConfigError, match=r"sources\.ip1\.warmup_start"):
        build_config({"sources": {"ip1": {"address": "127.0.0.2", "warmup": [10, 20]}}}, "t")
    with pytest.raises(ConfigError, match=r"pool_select\.default"):
        build_config({"pool_select": {"default": "missing"}}, "t")


def test_the_ladder_holds_or_steps_back_when_yesterday_went_badly(world):
    ip1, _ip2, pools, counter, _ = world
    ip1.ladder = (10, 20, 40, 80, 160)
    clock = clock_at(DAY0 + datetime.timedelta(days=2))  # day 3: cap 40
    sel = SourceSelector(clock, pools, counter=counter, bounce_rate=0.05, deferral_rate=0.2, min_sample=20)
    today = sel.today()
    assert ip1.cap(today, sel.offset(ip1, today)) == 40
    # Day 3 goes badly: 10 % bounces (twice the threshold: step back), judged on day 4.
    for code in [250] * 18 + [550] * 2:
        sel.outcome(ip1, code)
    clock.advance(86400)
    today = sel.today()
    assert ip1.cap(today, sel.offset(ip1, today)) == 20  # day 4 would be 80; stepped back two steps
    for code in [250] * 17 + [451] * 5:  # ~23 % deferred: above the threshold, under twice: hold
        sel.outcome(ip1, code)
    clock.advance(86400)
    today = sel.today()
    assert ip1.cap(today, sel.offset(ip1, today)) == 20  # day 5: held, the same cap as day 4
    clock.advance(86400)  # a quiet day: too few results to judge, the ladder climbs again
    today = sel.today()
    assert ip1.cap(today, sel.offset(ip1, today)) == 40


def test_complaints_and_later_bounces_from_the_feedback_loop_count_against_the_sending_source(world):
    ip1, _ip2, pools, counter, _ = world
    ip1.ladder = (10, 20, 40, 80)
    clock = clock_at(DAY0 + datetime.timedelta(days=1))  # day 2: cap 20
    sel = SourceSelector(clock, pools, counter=counter, complaint_rate=0.01, min_sample=20)
    for i in range(20):
        sel.sent(ip1, qid=f"Q{i:018d}")
        sel.outcome(ip1, 250)
    assert sel.feedback(f"Q{3:018d}", "complaint") == "ip1"  # 1 complaint in 20 = 5 %, over 2 x 1 %
    assert sel.feedback("UNKNOWNQID000000000", "complaint") is None
    clock.advance(86400)
    today = sel.today()
    assert ip1.cap(today, sel.offset(ip1, today)) == 10  # day 3 would be 40; one step below day 2 instead


def test_the_feedback_processor_reports_bounces_and_complaints_to_the_sources(tmp_path, world):
    from pymta.feedback.parse import parse_message
    from pymta.feedback.processor import FeedbackProcessor
    from pymta.feedback.suppression import SuppressionStore
    from pymta.feedback.verp import Tagger
    from tests.test_feedback_processor import arf, dsn

    ip1, _ip2, pools, counter, _ = world
    sources = SourceSelector(clock_at(DAY0), pools, default_pool="warm", counter=counter)
    store = SuppressionStore(str(tmp_path / "s.sqlite"), task.Clock())
    tagger = Tagger("0123456789abcdef-secret", "bounces.sender.test")
    processor = FeedbackProcessor(store, tagger, complaint_addresses=("fbl@sender.test",), sources=sources)
    qid = new_qid()
    source, _ = sources.pick(envelope())
    sources.sent(source, qid=qid)
    rp = tagger.return_path(qid, "carol@remote.test")
    env = Envelope(qid=new_qid(), sender="", recipients=[])
    processor.handle(rp, env, parse_message(dsn(rp, "carol@remote.test")))
    processor.handle("fbl@sender.test", env, parse_message(arf(tagger.trace_value(qid, "dave@remote.test"))))
    assert counter.outcomes(ip1.name, DAY0) == {"bounced": 1, "complaint": 1}
    assert sources.feedback(new_qid(), "bounced") is None  # a message no source remembers
    store.close()


def test_a_provider_can_have_its_own_ladder_for_a_source(world):
    ip1, _ip2, pools, counter, _ = world
    ip1.provider_ladders = {"google": (1, 2)}
    sel = SourceSelector(clock_at(DAY0), pools, default_pool="warm", counter=counter)
    source, _ = sel.pick(envelope(), "google")
    sel.sent(source, provider="google")
    assert sel.pick(envelope(), "google")[0] is None  # google's ladder: 1 on day 1
    assert sel.pick(envelope(), "other")[0] is ip1  # the source's own ladder: 2 on day 1, 1 used
    with pytest.raises(ConfigError, match=r"sources\.s\.warmup_provider\.google"):
        build_config({"sources": {"s": {"address": "127.0.0.2", "warmup_start": "2026-11-20",
                                        "warmup_provider": {"google": [1]}}}}, "t")  # fmt: skip
