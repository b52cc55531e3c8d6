"""Wires the HTTP service from ``[http]``: the admin listener (API, injection, /metrics, /healthz)
and the public listener (one-click unsubscribe), as services of the MTA's MultiService."""

from __future__ import annotations

from typing import Any, cast

from twisted.application import service, strports
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web import resource
from twisted.web.resource import IResource

from pymta.admin.http.admin import AdminAPI, disk_health
from pymta.admin.http.inject import InjectAPI
from pymta.admin.http.jsonapi import JSONAPI, APIError, APISite, send_json
from pymta.admin.http.metrics import Metrics
from pymta.admin.http.public import public_root
from pymta.admin.http.tokens import TokenChecker, load_tokens
from pymta.interfaces import QUEUE_STATES, QueueError


class MetricsObserver(service.Service):
    """Feeds the metrics from the log events while the MTA runs."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        globalLogPublisher.addObserver(cast(ILogObserver, self.metrics.observe))

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        globalLogPublisher.removeObserver(cast(ILogObserver, self.metrics.observe))


class CloseRenderer(service.Service):
    def __init__(self, inject: InjectAPI) -> None:
        self.inject = inject

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.inject.close()


class MetricsPage(resource.Resource):
    """``GET /metrics`` in the Prometheus text format; with ``metrics_auth`` a "read" token."""

    isLeaf = True

    def __init__(self, metrics: Metrics, api: JSONAPI, need_token: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.metrics = metrics
        self.api = api
        self.need_token = need_token

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.need_token:
            try:
                self.api.authorise(request, "read")
            except APIError as e:
                send_json(request, e.status, e.body())
                return b""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.metrics.registry)


class AdminRoot(resource.Resource):
    """``/metrics`` to the metrics page, everything else to the JSON API."""

    def __init__(self, api: JSONAPI, metrics_page: resource.Resource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.api = api
        self.putChild(b"metrics", cast(IResource, metrics_page))

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        request.postpath.insert(0, path)
        request.prepath.pop()
        return self.api

    def render(self, request: Any) -> Any:
        return self.api.render(request)


def make_metrics(config: Any) -> Metrics | None:
    """The metrics, when the admin listener is configured (the receiver counts into them)."""
    if not config.http.listen:
        return None
    h = config.http
    return Metrics(
        frozenset(h.metric_campaigns) if h.metric_campaigns is not None else None,
        frozenset(h.metric_tenants) if h.metric_tenants is not None else None,
    )


def build_http(
    config: Any,
    reactor: Any,
    top: service.MultiService,
    *,
    store: Any,
    operations: Any,
    policy: Any,
    threadpool: Any,
    metrics: Metrics | None,
    suppression: Any = None,
    tagger: Any = None,
    accounting: Any = None,
    on_queued: Any = None,
    shaper: Any = None,
    sign: Any = None,
    agent: Any = None,
    selector: Any = None,
    events: Any = None,
    records_at_pickup: bool = False,
) -> None:
    h = config.http
    tracking = _tracker(config) if events is not None and config.tracking.enabled else None
    if h.listen:
        tokens = TokenChecker(load_tokens(h.tokens_file) if h.tokens_file else [])
        api = JSONAPI(tokens)
        min_free = int(getattr(config.queue, "min_free", 0) or 0)

        def health() -> dict[str, Any]:
            report = disk_health(config.queue_dir, min_free, lambda: listener_status(top))
            report["queue"] = {state: len(store.list(state)) for state in QUEUE_STATES}
            return report

        AdminAPI(operations, reactor, threadpool, reactor, suppression, health).register(api)
        inject = InjectAPI(
            store, policy, reactor, reactor, config.hostname, config.smtp.max_message_size,
            suppression=suppression, accounting=accounting, on_queued=on_queued,
            records_at_pickup=records_at_pickup, template_timeout=h.template_timeout, metrics=metrics, sign=sign, tracker=tracking,
        )  # fmt: skip
        inject.register(api)
        CloseRenderer(inject).setServiceParent(top)
        assert metrics is not None
        metrics.add_gauges(lambda: _gauges(store, suppression, shaper, agent, operations.suspensions, operations.webhooks))
        MetricsObserver(metrics).setServiceParent(top)
        root = AdminRoot(api, MetricsPage(metrics, api, h.metrics_auth))
        series = add_dashboard(config, reactor, top, root, api, threadpool, store, suppression, accounting, shaper,
                               selector, operations.webhooks)  # fmt: skip
        metrics.on_received.append(lambda qid: _count_received(series, store, qid))
        site = APISite(root, h.max_body, reactor=reactor)
        for endpoint in h.listen:
            strports.service(endpoint, cast(IProtocolFactory, site), reactor=reactor).setServiceParent(top)
    if h.public_listen:
        public = APISite(public_root(tagger, suppression, events, tracking.tokens if tracking else None), 64 * 1024,
                         reactor=reactor)  # fmt: skip
        for endpoint in h.public_listen:
            strports.service(endpoint, cast(IProtocolFactory, public), reactor=reactor).setServiceParent(top)


def listener_status(top: service.MultiService) -> list[dict[str, Any]]:
    """Every listening endpoint of the MTA (SMTP, submission, HTTP): its address once bound, and
    whether it listens now (a port that could not be bound says why)."""
    from twisted.application.internet import StreamServerEndpointService

    out = []
    for svc in top:
        if not isinstance(svc, StreamServerEndpointService):
            continue
        waiting = getattr(svc, "_waitingForPort", None)
        entry: dict[str, Any] = {"listening": False}
        if waiting is not None and waiting.called:
            port = waiting.result
            if hasattr(port, "getHost"):
                host = port.getHost()
                entry = {"listening": bool(svc.running), "address": f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"}
            elif hasattr(port, "getErrorMessage"):
                entry["error"] = port.getErrorMessage()[:200]
        out.append(entry)
    return out


def add_dashboard(config: Any, reactor: Any, top: service.MultiService, root: resource.Resource, api: JSONAPI,
                  threadpool: Any, store: Any, suppression: Any, accounting: Any, shaper: Any, selector: Any,
                  webhooks: Any = None) -> Any:  # fmt: skip
    """The time series (fed from the log events), ``GET /`` and ``GET /api/v1/reports``; returns the series."""
    from twisted.internet import threads

    from pymta.admin.http.dashboard import Dashboard, DashboardData, ReportsAPI
    from pymta.stats.report import provider_namer, stats_path
    from pymta.stats.service import StatsService
    from pymta.stats.timeseries import TimeSeries

    def run(f: Any, *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, threadpool, f, *args)

    namer = provider_namer(config)
    series = TimeSeries(stats_path(config), reactor, run, config.stats.retention, namer)
    series.gauge_readers.append(lambda: _stat_gauges(store, suppression, webhooks))
    StatsService(series).setServiceParent(top)
    w = config.warmup
    thresholds = {"bounce_rate": w.bounce_rate, "deferral_rate": w.deferral_rate, "complaint_rate": w.complaint_rate}
    dashboard = Dashboard(api, DashboardData(series, run, reactor, thresholds, selector, shaper))
    for path in (b"", b"login", b"logout"):
        root.putChild(path, cast(IResource, dashboard))
    ReportsAPI(config, reactor, run, series, accounting, namer).register(api)
    return series


def _count_received(series: Any, store: Any, qid: str) -> None:
    """The time series counts a message as the metrics do: once per queue id, from any listener."""
    try:
        envelope = store.load(qid)
    except (KeyError, ValueError, QueueError):  # already gone (deleted): nothing to count by
        return
    series.received(envelope)


def _stat_gauges(store: Any, suppression: Any, webhooks: Any = None) -> dict[str, float]:
    values: dict[str, float] = {f"queue.{state}": len(store.list(state)) for state in QUEUE_STATES}
    if suppression is not None and hasattr(suppression, "count"):
        values["suppressions"] = suppression.count()
    if webhooks is not None:  # events not yet accepted, summed over the endpoints
        values["webhook_backlog"] = sum(status["backlog"] for status in webhooks.status())
    return values


def _tracker(config: Any) -> Any:
    from pymta.events.tracking import Tracker

    return Tracker(config.tracking, config.http.public_url, config.tracking.secret or config.feedback.secret)


def _gauges(store: Any, suppression: Any, shaper: Any, agent: Any = None, suspensions: Any = None,
            webhooks: Any = None) -> dict[str, Any]:  # fmt: skip
    values: dict[str, Any] = {"queue": {state: len(store.list(state)) for state in QUEUE_STATES}}
    if webhooks is not None:
        values["webhooks"] = webhooks.status()
    if suppression is not None and hasattr(suppression, "count"):
        values["suppressions"] = suppression.count()
    if shaper is not None:
        states = [shaper.explain(key) for key in sorted(shaper.states)]
        now = shaper.clock.seconds() if hasattr(shaper, "clock") else 0
        values["paused_destinations"] = sum(1 for s in states if (s.get("paused_until") or 0) > now)
    if agent is not None:
        values["connections"] = dict(getattr(agent, "active", {}))
    if suspensions is not None:
        by_kind: dict[str, int] = {}
        for row in suspensions.in_force():
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + 1
        values["suspensions"] = by_kind
    return values

