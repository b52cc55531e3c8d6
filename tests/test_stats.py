"""The per-minute time series (on task.Clock, writes inline) and the delivery report."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from twisted.internet import defer, task

from pymta.stats.report import build_report, to_csv
from pymta.stats.timeseries import TimeSeries


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


def _series(tmp_path, clock, retention=30 * 86400.0):
    names = {"gmail.com": "gmail"}
    return TimeSeries(str(tmp_path / "stats.sqlite"), clock, inline, retention, lambda d, mx: names.get(d, d))


def _delivery(kind, rcpt, source="s1", campaign="c1", code=250, enhanced="2.0.0", text="ok"):
    return {"log_namespace": "pymta.queue", "event": kind, "rcpt": rcpt, "source": source, "campaign": campaign,
            "code": code, "enhanced": enhanced, "text": text, "mx": "mx.example"}  # fmt: skip


def test_events_are_counted_per_minute_by_provider_source_and_campaign(tmp_path):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    ts = _series(tmp_path, clock)
    ts.received(SimpleNamespace(recipients=["a", "b", "c"], extra={"campaign": "c1"}))
    # The log event of the accepting process is not counted: the once-per-queue-id call above is.
    ts.observe({"log_namespace": "pymta.inbound", "event": "queued", "nrcpt": 3, "campaign": "c1"})
    ts.observe(_delivery("delivered", "a@gmail.com"))
    ts.observe(_delivery("delivered", "b@gmail.com"))
    clock.advance(60)
    ts.observe(_delivery("bounced", "c@other.test", code=550, enhanced="5.1.1", text="user unknown"))
    ts.observe(_delivery("bounced", "d@other.test", code=552, enhanced="5.2.2", text="mailbox full"))
    ts.observe(_delivery("deferred", "e@gmail.com", code=451, enhanced="4.7.0", text="try later"))
    ts.observe(
        {"log_namespace": "pymta.feedback", "event": "feedback", "kind": "arf", "outcome": "suppressed"}
    )
    ts.observe({"log_namespace": "pymta.tracking", "event": "open", "machine": True, "campaign": "c1"})
    ts.observe({"log_namespace": "pymta.tracking", "event": "click", "campaign": "c1"})
    ts.observe({"log_namespace": "other", "event": "delivered"})  # not ours: not counted
    ts.observe(
        {"log_namespace": "pymta.queue", "event": "bounced", "rcpt": None, "code": object()}
    )  # never raises
    ts.flush()
    t0 = 1_800_000_000 // 60 * 60
    per = ts.per_minute(t0, t0 + 120, ("delivered", "bounced_hard", "bounced_soft", "deferred"))
    assert per["delivered"] == {t0: 2}
    assert per["bounced_hard"] == {t0 + 60: 1}
    assert per["bounced_soft"] == {t0 + 60: 1}
    assert ts.per_minute(t0, t0 + 120, ("deferred",), "gmail")["deferred"] == {t0 + 60: 1}
    by_provider = ts.totals(t0, t0 + 120, "provider")
    assert by_provider["gmail"] == {"delivered": 2, "deferred": 1}
    assert by_provider["other.test"] == {"bounced_hard": 1, "bounced_soft": 1}
    overall = ts.totals(t0, t0 + 120)[""]
    assert overall["received"] == 3
    assert overall["complaints"] == 1
    assert overall["opens_machine"] == 1
    assert overall["clicks"] == 1
    assert ts.totals(t0, t0 + 120, "campaign")["c1"]["delivered"] == 2
    assert [r for r, _ in ts.top_reasons(t0, t0 + 120)]
    assert sum(
        n for _, n in ts.top_reasons(t0, t0 + 120)
    ) == 2


def test_gauges_are_sampled_every_minute_and_old_rows_expire(tmp_path):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    ts = _series(tmp_path, clock, retention=3600)
    depth = {"queue.active": 1, "queue.deferred": 5}
    ts.gauge_readers.append(lambda: dict(depth))
    ts.start()
    for _ in range(3):
        depth["queue.deferred"] += 1
        clock.advance(60)
    ts.flush()
    t0 = 1_800_000_000 // 60 * 60
    gauges = ts.gauge_series(t0, t0 + 600)
    assert sorted(gauges["queue.deferred"].values()) == [5, 6, 7, 8]
    ts.count("delivered")
    clock.advance(2 * 3600)  # past the retention; the hourly prune runs with the next batch
    ts.count("delivered")
    ts.flush()
    assert ts.gauge_series(0, t0 + 600) == {}
    assert ts.totals(0, t0 + 3 * 3600)[""]["delivered"] == 1
    ts.stop()
    ts.close()


def test_a_write_in_progress_holds_the_next_batch(tmp_path):
    clock = task.Clock()
    pending: list[defer.Deferred] = []

    def later(f, *args):
        d = defer.Deferred()
        pending.append(d)
        return d.addCallback(lambda _: f(*args))

    ts = TimeSeries(str(tmp_path / "s.sqlite"), clock, later)
    ts.count("delivered")
    first = ts.flush()
    ts.count("delivered")
    assert ts.flush() is first
    assert len(pending) == 1
    pending[0].callback(None)
    ts.flush()
    pending[1].callback(None)
    assert ts.totals(0, 120)[""]["delivered"] == 2


def _write_accounting(path, now_iso):
    records = [
        {"time": now_iso, "event": "received", "recipient": "a@gmail.com", "campaign": "spring"},
        {"time": now_iso, "event": "received", "recipient": "b@gmail.com", "campaign": "spring"},
        {"time": now_iso, "event": "received", "recipient": "c@other.test", "campaign": "spring"},
        {
            "time": now_iso,
            "event": "delivered",
            "recipient": "a@gmail.com",
            "campaign": "spring",
            "queue_time": 1.0,
            "source": "s1",
        },
        {
            "time": now_iso,
            "event": "delivered",
            "recipient": "b@gmail.com",
            "campaign": "spring",
            "queue_time": 3.0,
            "source": "s1",
        },
        {
            "time": now_iso,
            "event": "bounced",
            "recipient": "c@other.test",
            "campaign": "spring",
            "source": "s2",
            "reply": {"code": 550, "enhanced": "5.1.1", "text": "5.1.1 user unknown"},
        },
        {"time": now_iso, "event": "feedback", "kind": "arf", "outcome": "suppressed a@gmail.com"},
        {"time": "2000-01-01T00:00:00+00:00", "event": "delivered", "recipient": "old@gmail.com"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")


def test_report_counts_rates_and_times_from_the_accounting_log(tmp_path):
    now = 1_800_000_000.0
    from datetime import UTC, datetime

    path = tmp_path / "accounting.jsonl"
    _write_accounting(path, datetime.fromtimestamp(now - 10, UTC).isoformat())
    report = build_report(str(path), now, 3600, None)
    total = report["total"]
    assert (total["sent"], total["delivered"], total["bounced_hard"], total["complaints"]) == (3, 2, 1, 1)
    assert total["delivery_rate"] == round(2 / 3, 4)
    assert total["complaint_rate"] == 0.5
    assert total["time_to_deliver_median"] in (1.0, 3.0)
    assert total["time_to_deliver_p95"] == 3.0
    assert total["top_bounce_reasons"][0]["count"] == 1
    by_source = {g["group"]: g for g in build_report(str(path), now, 3600, "source")["groups"]}
    assert by_source["s1"]["delivered"] == 2
    assert by_source["s2"]["bounced_hard"] == 1
    names = {"gmail.com": "gmail"}
    by_provider = {g["group"]: g for g in build_report(str(path), now, 3600, "provider", None,
                                                         lambda d, mx: names.get(d, d))["groups"]}  # fmt: skip
    assert by_provider["gmail"]["delivered"] == 2
    assert by_provider["other.test"]["sent"] == 1
    assert to_csv(report).splitlines()[0].startswith("group,sent,delivered")


def test_pymta_report_prints_json_and_csv_and_refuses_a_bad_since(tmp_path):
    state = tmp_path / "var"
    (state / "log").mkdir(parents=True)
    from datetime import UTC, datetime

    _write_accounting(state / "log" / "accounting.jsonl", datetime.now(UTC).isoformat())
    config = tmp_path / "pymta.toml"
    config.write_text(f'hostname = "mx.example.test"\nstate_dir = "{state}"\n[stats]\nretention = "7d"\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "pymta.stats.report", "--config", str(config), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
    out = run("--json", "--by", "campaign")
    assert out.returncode == 0, out.stderr
    groups = {g["group"]: g for g in json.loads(out.stdout)["groups"]}
    assert groups["spring"]["delivered"] == 2
    assert groups["spring"]["sent"] == 3
    assert run("--csv").stdout.splitlines()[-1].startswith("total,3,2,1,")
    bad = run("--since", "soon")
    assert (
        bad.returncode == 2
    )
    assert (
        bad.stderr.startswith("pymta-report: since:")
    )
    assert (
        "Traceback" not in bad.stderr
    )


def test_stats_retention_below_an_hour_is_a_config_error(tmp_path):
    from pymta.config import ConfigError, load_config

    path = tmp_path / "pymta.toml"
    path.write_text('[stats]\nretention = "5m"\n')
    try:
        load_config(str(path))
    except ConfigError as e:
        assert str(e) == f"{path}: stats.retention: must be at least 3600s, got '5m'"
    else:
        raise AssertionError("accepted")


def test_dashboard_shows_ladders_rates_against_thresholds_and_shaping_holds(tmp_path):
    from datetime import date

    from pymta.admin.http.dashboard import DashboardData, render_dashboard
    from pymta.outbound.pools import Pool, Source, SourceSelector, WarmupCounter
    from pymta.outbound.shaping import Limits, Shaper

    clock = task.Clock()
    clock.advance(1_800_000_000)  # 2027-01-15
    ts = _series(tmp_path, clock)
    for _ in range(8):
        ts.observe(_delivery("delivered", "a@gmail.com", source="ip1"))
    for _ in range(2):
        ts.observe(_delivery("bounced", "b@gmail.com", source="ip1", code=550, enhanced="5.1.1", text="no such user"))
    ip1 = Source("ip1", "127.0.0.2", "mx1.example.test", ladder=(50, 100, 200), start=date(2027, 1, 14))
    counter = WarmupCounter(str(tmp_path / "warmup.sqlite"))
    selector = SourceSelector(clock, {"main": Pool("main", [(ip1, 1)])}, default_pool="main", counter=counter)
    selector.sent(ip1, 37)
    shaper = Shaper(clock, Limits(connections=2))
    held = shaper.state("provider:gmail")
    held.paused_until, held.reason = clock.seconds() + 600, "421 4.7.0 try again later"
    thresholds = {"bounce_rate": 0.05, "deferral_rate": 0.2, "complaint_rate": 0.001}
    data = DashboardData(ts, inline, clock, thresholds, selector, shaper)
    html = render_dashboard(data.gather("day").result, thresholds).decode()
    assert "<tr><td>ip1</td><td>main</td><td>2</td><td>100</td><td>37</td><td>0</td></tr>" in html
    assert "<td>gmail</td><td>8</td><td>20.00%</td>" in html  # by provider: 2 of 10 bounced
    assert html.count('fill="#c8372d"/>') >= 2  # over the 5 % threshold: red, for provider and source
    assert "provider:gmail" in html
    assert "421 4.7.0 try again later" in html
    assert '<meta http-equiv="refresh" content="60">' in html
    counter.close()
    ts.close()
