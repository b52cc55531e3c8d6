"""The dashboard on the admin listener: ``GET /`` (a login form that sets an HttpOnly cookie, or
a bearer token with the "read" scope) and a page of SVG plots drawn here from the time series,
the queue, the warm-up ladders and shaping. The page refreshes itself and loads nothing else."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from html import escape
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from pymta.admin.http.jsonapi import JSONAPI, APIError
from pymta.stats.svg import bar, line_chart

log = Logger(namespace="pymta.http")

COOKIE = b"pymta_token"
_COOKIE_SAFE = re.compile(rb"^[A-Za-z0-9._~+/=-]{1,512}$")
RANGES = {"hour": (3600, 60), "day": (86400, 900), "week": (7 * 86400, 3600)}
TOP_PROVIDERS = 4
CSP = b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
STYLE = """body{font:13px sans-serif;margin:16px;color:#222}h2{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:8px}nav a{margin-right:8px}"""


def _page(title: str, body: str, refresh: int | None = None) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>").encode()  # fmt: skip


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


class DashboardData:
    """Gathers what the page shows: SQLite reads in the thread pool, live state on the reactor."""

    def __init__(self, series: Any, run_in_thread: Any, clock: Any, thresholds: dict[str, float],
                 selector: Any = None, shaper: Any = None) -> None:  # fmt: skip
        self.series = series
        self.run_in_thread = run_in_thread
        self.clock = clock
        self.thresholds = thresholds
        self.selector = selector
        self.shaper = shaper

    @defer.inlineCallbacks
    def gather(self, range_name: str) -> Any:
        span, step = RANGES[range_name]
        self.series.sample()  # the gauges as they are now, not as they were at the last minute's sample
        yield self.series.flush()
        now = int(self.clock.seconds())
        until = (now // 60 + 1) * 60
        since = until - span
        data = yield self.run_in_thread(self._read, since, until, step)
        data.update(since=since, until=until, step=step, range=range_name)
        data["ladders"] = self._ladders()
        data["holds"] = self._holds()
        return data

    def _read(self, since: int, until: int, step: int) -> dict[str, Any]:
        s = self.series
        outcomes = ("delivered", "deferred", "bounced_hard", "bounced_soft")
        by_provider = s.totals(since, until, "provider")
        volume = {p: sum(m.get(k, 0) for k in outcomes) for p, m in by_provider.items() if p}
        providers = sorted(volume, key=lambda p: (-volume[p], p))[:TOP_PROVIDERS]
        return {
            "overall": _bucket(s.per_minute(since, until, outcomes), since, until, step),
            "providers": {
                p: _bucket(s.per_minute(since, until, outcomes, p), since, until, step) for p in providers
            },
            "totals": s.totals(since, until).get("", {}),
            "by_provider": by_provider,
            "by_source": s.totals(since, until, "source"),
            "gauges": s.gauge_series(since, until),
            "reasons": s.top_reasons(since, until),
        }

    def _ladders(self) -> list[dict[str, Any]]:
        sel = self.selector
        if sel is None:
            return []
        today = datetime.fromtimestamp(self.clock.seconds(), UTC).date()
        out = []
        seen = set()
        for pool in sel.pools.values():
            for source, _weight in pool.members:
                if source.name in seen:
                    continue
                seen.add(source.name)
                offset = sel.counter.ladder(source.name)[0] if sel.counter is not None else 0
                day = (today - source.start).days + 1 if isinstance(source.start, date) else None
                sent = sel.counter.count(source.name, today) if sel.counter is not None else None
                out.append({"source": source.name, "pool": pool.name, "day": day, "cap": source.cap(today, offset),
                            "sent_today": sent, "held_back_steps": offset})  # fmt: skip
        return out

    def _holds(self) -> list[dict[str, Any]]:
        sh = self.shaper
        if sh is None:
            return []
        now = self.clock.seconds()
        held = []
        for key in sorted(sh.states)[:1000]:
            e = sh.explain(key)
            if (e.get("paused_until") or 0) > now or e.get("waiting") or (e.get("share") or 1) < 1:
                held.append(e)
        return held


def _bucket(
    per_minute: dict[str, dict[int, int]], since: int, until: int, step: int
) -> dict[str, list[tuple[int, int]]]:
    """delivered/deferred/bounced summed into ``step``-second buckets."""
    names = {
        "delivered": ("delivered",),
        "deferred": ("deferred",),
        "bounced": ("bounced_hard", "bounced_soft"),
    }
    out = {}
    for name, metrics in names.items():
        buckets = dict.fromkeys(range(since, until, step), 0)
        for metric in metrics:
            for minute, n in per_minute.get(metric, {}).items():
                start = since + (minute - since) // step * step
                if start in buckets:
                    buckets[start] += n
        out[name] = sorted(buckets.items())
    return out


def render_dashboard(data: dict[str, Any], thresholds: dict[str, float]) -> bytes:
    since, until, step = data["since"], data["until"], data["step"]
    t = data["totals"]
    bounced = t.get("bounced_hard", 0) + t.get("bounced_soft", 0)
    nav = " ".join(f'<a href="/?range={r}">{r}</a>' for r in RANGES)
    body = [f'<h1>pymta</h1><nav>{nav} <form method="post" action="/logout" style="display:inline">'
            '<button>log out</button></form></nav>']  # fmt: skip
    body.append(f'<h2>Last {data["range"]} ({step // 60} min per point)</h2><table id="totals"><tr>'
                + "".join(f"<th>{k}</th>" for k in ("received", "delivered", "deferred", "bounced", "expired",
                                                      "complaints", "opens", "clicks"))
                + "</tr><tr>"
                + "".join(f'<td data-total="{k}">{v}</td>' for k, v in (
                    ("received", t.get("received", 0)), ("delivered", t.get("delivered", 0)),
                    ("deferred", t.get("deferred", 0)), ("bounced", bounced), ("expired", t.get("expired", 0)),
                    ("complaints", t.get("complaints", 0)),
                    ("opens", t.get("opens_human", 0) + t.get("opens_machine", 0)), ("clicks", t.get("clicks", 0))))
                + "</tr></table>")  # fmt: skip
    charts = [line_chart("all destinations, per " + f"{step // 60} min", data["overall"], since, until)]
    charts += [
        line_chart(f"provider {p}", series, since, until, 420, 160) for p, series in data["providers"].items()
    ]
    body.append('<div class="charts" id="flow">' + "".join(charts) + "</div>")
    gauges = data["gauges"]
    depth = {
        name[len("queue.") :]: sorted(points.items())
        for name, points in gauges.items()
        if name.startswith("queue.")
    }
    other = [line_chart("suppression list size", {"suppressions": sorted(gauges["suppressions"].items())}, since, until,
                        420, 160)] if "suppressions" in gauges else []  # fmt: skip
    if "webhook_backlog" in gauges:
        other.append(line_chart("webhook backlog", {"events": sorted(gauges["webhook_backlog"].items())}, since, until,
                                420, 160))  # fmt: skip
    body.append('<h2>Queue</h2><div class="charts" id="queue">' + line_chart("queue depth by state", depth, since, until)
                + "".join(other) + "</div>")  # fmt: skip
    for title, rows, ident in (("providers", data["by_provider"], "rates-provider"),
                               ("sources", data["by_source"], "rates-source")):  # fmt: skip
        body.append(
            f'<h2>Rates by {title} (mark = warm-up threshold)</h2><table id="{ident}"><tr><th>{title[:-1]}</th>'
            "<th>delivered</th><th>bounce</th><th></th><th>deferral</th><th></th><th>complaint</th><th></th></tr>"
        )
        for name, m in sorted(rows.items()):
            if not name:
                continue
            d, b, f = (
                m.get("delivered", 0),
                m.get("bounced_hard", 0) + m.get("bounced_soft", 0),
                m.get("deferred", 0),
            )
            rates = (_rate(b, d + b), _rate(f, d + b + f), _rate(m.get("complaints", 0), d))
            cells = "".join(
                f"<td>{_pct(r)}</td><td>{bar(r, thresholds.get(k))}</td>"
                for r, k in zip(rates, ("bounce_rate", "deferral_rate", "complaint_rate"), strict=True)
            )
            body.append(f"<tr><td>{escape(name)}</td><td>{d}</td>{cells}</tr>")
        body.append("</table>")
    body.append('<h2>Warm-up</h2><table id="warmup"><tr><th>source</th><th>pool</th><th>day</th><th>cap</th>'
                "<th>sent today</th><th>held back (steps)</th></tr>")  # fmt: skip
    for w in data["ladders"]:
        cap = "no cap" if w["cap"] is None else w["cap"]
        body.append(f"<tr><td>{escape(w['source'])}</td><td>{escape(w['pool'])}</td><td>{w['day'] or '-'}</td>"
                    f"<td>{cap}</td><td>{w['sent_today'] if w['sent_today'] is not None else '-'}</td>"
                    f"<td>{w['held_back_steps']}</td></tr>")  # fmt: skip
    body.append(
        '</table><h2>Top bounce reasons</h2><table id="reasons"><tr><th>reason</th><th>count</th></tr>'
    )
    body += [f"<tr><td>{escape(r)}</td><td>{n}</td></tr>" for r, n in data["reasons"]]
    body.append('</table><h2>Held back by shaping now</h2><table id="holds"><tr><th>destination</th><th>paused until</th>'
                "<th>share</th><th>waiting</th><th>connections</th><th>why</th></tr>")  # fmt: skip
    for h in data["holds"]:
        until_text = (
            datetime.fromtimestamp(h["paused_until"], UTC).strftime("%H:%M:%S")
            if h.get("paused_until")
            else "-"
        )
        body.append(f"<tr><td>{escape(h['key'])}</td><td>{until_text}</td><td>{h.get('share')}</td>"
                    f"<td>{h.get('waiting')}</td><td>{h.get('connections')}</td><td>{escape(str(h.get('reason') or ''))}</td></tr>")  # fmt: skip
    body.append("</table>")
    return _page("pymta dashboard", "".join(body), refresh=60)


LOGIN = _page("pymta login", '<h1>pymta</h1><form method="post" action="/login"><label>API token (read scope) '
              '<input type="password" name="token" autocomplete="current-password" autofocus></label> '
              '<button id="login">log in</button></form>{error}')  # fmt: skip


class Dashboard(resource.Resource):
    """``GET /`` (``?range=hour|day|week``), ``POST /login``, ``POST /logout``."""

    isLeaf = True

    def __init__(self, api: JSONAPI, data: DashboardData) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.api = api
        self.data = data

    def _authorised(self, request: Any) -> bool:
        if request.getHeader(b"authorization"):
            try:
                self.api.authorise(request, "read")
                return True
            except APIError:
                return False
        cookie = request.getCookie(COOKIE)
        token = self.api.tokens.check(cookie.decode("latin-1")) if cookie and self.api.tokens else None
        return token is not None and token.allows("read")

    def _html(self, request: Any, status: int, page: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", CSP)
        request.setHeader(b"X-Frame-Options", b"DENY")
        return page

    def _login_page(self, request: Any, status: int = 200, error: str = "") -> bytes:
        text = f'<p class="error">{escape(error)}</p>' if error else ""
        return self._html(request, status, LOGIN.replace(b"{error}", text.encode()))

    def render_GET(self, request: Any) -> Any:
        if request.path not in (b"/", b""):
            return self._html(request, 404, _page("not found", "<p>Not found.</p>"))
        if not self._authorised(request):
            return self._login_page(request)
        range_name = (request.args.get(b"range") or [b"hour"])[0].decode("ascii", "replace")
        if range_name not in RANGES:
            range_name = "hour"
        d = self.data.gather(range_name)

        def done(data: dict[str, Any]) -> None:
            if not request.finished:
                request.write(self._html(request, 200, render_dashboard(data, self.data.thresholds)))
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("dashboard could not be drawn", failure)
            if not request.finished:
                request.write(
                    self._html(request, 500, _page("error", "<p>The dashboard could not be drawn.</p>"))
                )
                request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    def render_POST(self, request: Any) -> bytes:
        secure = b"; Secure" if request.isSecure() else b""
        if request.path == b"/logout":
            request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True, sameSite="strict")
        elif request.path == b"/login":
            presented = (request.args.get(b"token") or [b""])[0].strip()[:512]
            token = (
                self.api.tokens.check(presented.decode("latin-1")) if presented and self.api.tokens else None
            )
            if token is None or not token.allows("read") or not _COOKIE_SAFE.match(presented):
                log.info("dashboard login refused", event="dashboard_login_refused")
                return self._login_page(request, 401, "That token is not valid or lacks the read scope.")
            request.setHeader(
                b"Set-Cookie", COOKIE + b"=" + presented + b"; Path=/; HttpOnly; SameSite=Strict" + secure
            )
        else:
            return self._html(request, 404, _page("not found", "<p>Not found.</p>"))
        request.setResponseCode(303)
        request.setHeader(b"Location", b"/")
        request.setHeader(b"Cache-Control", b"no-store")
        return b""


class ReportsAPI:
    """``GET /api/v1/reports?since=24h&by=provider``: the report ``pymta-report --json`` prints."""

    def __init__(
        self, config: Any, clock: Any, run_in_thread: Any, series: Any, accounting: Any, namer: Any
    ) -> None:
        import os

        self.path = os.path.join(config.log_dir, "accounting.jsonl")
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.series = series
        self.accounting = accounting
        self.namer = namer

    def register(self, api: JSONAPI) -> None:
        api.route("GET", "/api/v1/reports", self.report, "read")

    def report(self, request: Any) -> Any:
        from pymta.admin.http.jsonapi import query
        from pymta.stats.report import BY, ReportError, build_report, parse_since

        try:
            since = parse_since(query(request, "since", "24h") or "24h")
        except ReportError as e:
            raise APIError(400, str(e), "since") from None
        by = query(request, "by")
        if by is not None and by not in BY:
            raise APIError(400, f"by: must be one of {', '.join(BY)}", "by")
        # Accounting records are on disk once their state changed (no buffer to flush first).
        d = self.series.flush() if self.series is not None else defer.succeed(None)
        now = self.clock.seconds()
        return d.addCallback(
            lambda _: self.run_in_thread(build_report, self.path, now, since, by, self.series, self.namer)
        )
