"""Delivery reports from the accounting log and the time series: ``pymta-report`` and
``GET /api/v1/reports`` build the same JSON here (one code path)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

from pymta.config import parse_duration
from pymta.feedback.classify import classify

BY = ("provider", "source", "pool", "campaign", "tenant", "day")
COUNTS = (
    "sent", "delivered", "bounced_hard", "bounced_soft", "deferred", "expired",
    "complaints", "unsubscribes", "opens_human", "opens_machine", "clicks",
)  # fmt: skip
FIELDS = ("group", *COUNTS, "delivery_rate", "complaint_rate", "time_to_deliver_median", "time_to_deliver_p95",
          "top_bounce_reasons")  # fmt: skip
MAX_GROUPS = 10_000  # further groups are counted under "other"
MAX_SAMPLES = 100_000  # queue times kept per group (reservoir beyond)
MAX_LINE = 1 << 20
_TRACKING = {"open": None, "click": "clicks", "complaint": "complaints", "unsubscribe": "unsubscribes"}


class ReportError(ValueError):
    """A bad report request (the text says which parameter and why)."""


def parse_since(value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise ReportError(f"since: {e}") from None
    if seconds <= 0 or seconds > 400 * 86400:
        raise ReportError("since: must be between 1s and 400d")
    return seconds


class _Group:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)
        self.times: list[float] = []
        self.seen_times = 0
        self.reasons: dict[str, int] = {}

    def add_time(self, value: float, rng: random.Random) -> None:
        self.seen_times += 1
        if len(self.times) < MAX_SAMPLES:
            self.times.append(value)
        else:
            i = rng.randrange(self.seen_times)
            if i < MAX_SAMPLES:
                self.times[i] = value

    def result(self, name: str) -> dict[str, Any]:
        c = self.counts
        out: dict[str, Any] = {"group": name, **c}
        final = c["delivered"] + c["bounced_hard"] + c["bounced_soft"] + c["expired"]
        out["delivery_rate"] = round(c["delivered"] / final, 4) if final else None
        out["complaint_rate"] = round(c["complaints"] / c["delivered"], 6) if c["delivered"] else None
        times = sorted(self.times)
        out["time_to_deliver_median"] = _percentile(times, 0.5)
        out["time_to_deliver_p95"] = _percentile(times, 0.95)
        top = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        out["top_bounce_reasons"] = [{"reason": r, "count": n} for r, n in top]
        return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return round(values[index], 3)


def _records(path: str) -> Iterator[dict[str, Any]]:
    """The accounting log's records, the rotated file first; bad lines are skipped."""
    for name in (path + ".1", path):
        if not os.path.exists(name):
            continue
        with open(name, encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline(MAX_LINE)
                if not line:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record


def _epoch(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def build_report(
    accounting_path: str,
    now: float,
    since: float = 86400.0,
    by: str | None = None,
    series: Any = None,
    provider_of: Callable[[str, str | None], str] | None = None,
) -> dict[str, Any]:
    """The report over the last ``since`` seconds, grouped ``by`` one of :data:`BY` (or overall).

    ``series`` (a :class:`pymta.stats.timeseries.TimeSeries`) adds opens, clicks, complaints and
    unsubscribes the accounting log does not carry. Runs in a thread (reads files and SQLite)."""
    if by is not None and by not in BY:
        raise ReportError(f"by: must be one of {', '.join(BY)}")
    provider_of = provider_of or (lambda domain, mx: domain)
    start = now - since
    groups: dict[str, _Group] = {}
    rng = random.Random(0)
    seen_tracking: set[str] = set()
    received_by_domain: dict[str, int] = {}
    domain_provider: dict[str, _Group] = {}

    def group_of(record: dict[str, Any]) -> _Group:
        if by is None:
            name = ""
        elif by == "day":
            name = str(record.get("time", ""))[:10]
        elif by == "provider":
            rcpt = str(record.get("recipient") or "")
            name = provider_of(rcpt.rpartition("@")[2].lower(), record.get("mx")) if "@" in rcpt else ""
        else:
            name = str(record.get(by) or "")[:64]
        if name not in groups and len(groups) >= MAX_GROUPS:
            name = "other"
        group = groups.setdefault(name, _Group())
        if by == "provider" and record.get("mx") and len(domain_provider) < MAX_GROUPS:
            domain_provider[str(record.get("recipient") or "").rpartition("@")[2].lower()] = group
        return group

    for record in _records(accounting_path):
        when = _epoch(record.get("time"))
        if when is None or when < start or when > now:
            continue
        event = record.get("event")
        if event == "received" and by == "provider":  # no MX yet: the provider its domain's deliveries name
            domain = str(record.get("recipient") or "").rpartition("@")[2].lower()[:253]
            if domain in received_by_domain or len(received_by_domain) < MAX_GROUPS:
                received_by_domain[domain] = received_by_domain.get(domain, 0) + 1
        elif event == "received":
            group_of(record).counts["sent"] += 1
        elif event in ("delivered", "deferred", "expired"):
            g = group_of(record)
            g.counts[event] += 1
            if event == "delivered" and isinstance(record.get("queue_time"), int | float):
                g.add_time(float(record["queue_time"]), rng)
        elif event == "bounced":
            g = group_of(record)
            reply = cast(dict[str, Any], record.get("reply") if isinstance(record.get("reply"), dict) else {})
            reason, hard = classify(reply.get("enhanced"), str(reply.get("text") or ""), reply.get("code"))
            g.counts["bounced_hard" if hard else "bounced_soft"] += 1
            g.reasons[reason] = g.reasons.get(reason, 0) + 1
        elif event == "feedback":
            if str(record.get("outcome") or "").startswith("unsubscribed"):
                group_of(record).counts["unsubscribes"] += 1
            elif record.get("kind") == "arf":
                group_of(record).counts["complaints"] += 1
        elif event in _TRACKING:
            seen_tracking.add(event)
            g = group_of(record)
            key = _TRACKING[event] or ("opens_machine" if record.get("machine") else "opens_human")
            g.counts[key] += 1
    for domain, n in received_by_domain.items():
        g = domain_provider.get(domain) or group_of({"recipient": "@" + domain})
        g.counts["sent"] += n
    if series is not None and by in (None, "provider", "source", "campaign"):
        # Opens and clicks recorded only as log events (not in the accounting log) come from the series.
        for name, metrics in series.totals(int(start // 60) * 60, int(now) + 60, by).items():
            if name not in groups and len(groups) >= MAX_GROUPS:
                name = "other"
            for metric in ("opens_human", "opens_machine", "clicks"):
                event = "click" if metric == "clicks" else "open"
                if metrics.get(metric) and event not in seen_tracking:
                    groups.setdefault(name, _Group()).counts[metric] += metrics[metric]
    total = _Group()
    for g in groups.values():
        for k, v in g.counts.items():
            total.counts[k] += v
        for r, n in g.reasons.items():
            total.reasons[r] = total.reasons.get(r, 0) + n
        for t in g.times:
            total.add_time(t, rng)
    iso: Callable[[float], str] = lambda t: datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")  # noqa: E731
    return {
        "since": iso(start),
        "until": iso(now),
        "by": by,
        "groups": [g.result(name) for name, g in sorted(groups.items())] if by is not None else [],
        "total": total.result("total"),
    }


def to_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for row in [*report["groups"], report["total"]]:
        reasons = "; ".join(f"{r['reason']}={r['count']}" for r in row["top_bounce_reasons"])
        writer.writerow([*(row[f] if row[f] is not None else "" for f in FIELDS[:-1]), reasons])
    return out.getvalue()


def to_text(report: dict[str, Any]) -> str:
    lines = [
        f"pymta report {report['since']} .. {report['until']}"
        + (f" by {report['by']}" if report["by"] else "")
    ]
    for row in [*report["groups"], report["total"]]:
        c = row
        rate = f"{c['delivery_rate']:.1%}" if c["delivery_rate"] is not None else "-"
        lines.append(
            f"{c['group'] or '(none)':<30} sent {c['sent']} delivered {c['delivered']} bounced {c['bounced_hard']}h/"
            f"{c['bounced_soft']}s deferred {c['deferred']} expired {c['expired']} complaints {c['complaints']} "
            f"unsubscribes {c['unsubscribes']} opens {c['opens_human']}+{c['opens_machine']}m clicks {c['clicks']} "
            f"delivery {rate} median {c['time_to_deliver_median']}s p95 {c['time_to_deliver_p95']}s"
        )
        for r in c["top_bounce_reasons"][:5]:
            lines.append(f"    {r['count']:>6}  {r['reason']}")
    return "\n".join(lines) + "\n"


def report_main(argv: list[str] | None = None) -> int:
    from pymta.config import ConfigError, default_config_path, load_config
    from pymta.stores import WallClock

    parser = argparse.ArgumentParser(
        prog="pymta-report", description="Delivery report from the accounting log."
    )
    parser.add_argument("--config", default=default_config_path())
    parser.add_argument("--since", default="24h", help="how far back (e.g. 1h, 24h, 7d)")
    parser.add_argument("--by", choices=BY)
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true")
    form.add_argument("--csv", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        since = parse_since(args.since)
    except (ConfigError, ReportError) as e:
        sys.stderr.write(f"pymta-report: {e}\n")
        return 2
    series = None
    path = stats_path(config)
    if os.path.exists(path):
        from pymta.stats.timeseries import TimeSeries

        series = TimeSeries(path, WallClock(), lambda f, *a: f(*a))
    report = build_report(os.path.join(config.log_dir, "accounting.jsonl"), WallClock().seconds(), since, args.by,
                          series, provider_namer(config))  # fmt: skip
    sys.stdout.write(
        json.dumps(report, indent=2) + "\n" if args.json else to_csv(report) if args.csv else to_text(report)
    )
    return 0


def stats_path(config: Any) -> str:
    return os.path.join(config.state_dir, "stats.sqlite")


def provider_namer(config: Any) -> Callable[[str, str | None], str]:
    """Names a recipient's provider from the shaping configuration's provider MX suffixes."""
    from pymta.stats.timeseries import provider_label

    providers = {name: tuple(p.mx_suffix) for name, p in config.shaping.provider.items() if p.mx_suffix}

    def name(domain: str, mx: str | None) -> str:
        host = (mx or "").split(" ")[0].lower().rstrip(".")
        for provider, suffixes in providers.items():
            if any(host == s or host.endswith("." + s) for s in suffixes):
                return provider_label("provider:" + provider, domain)
        return domain

    return name


if __name__ == "__main__":
    raise SystemExit(report_main())
