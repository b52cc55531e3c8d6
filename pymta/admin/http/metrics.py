"""Prometheus metrics (``prometheus-client``) for ``GET /metrics`` on the admin listener.

Counters follow the structured log events the rooms already emit (``queued``, the queue
manager's delivered/deferred/bounced/expired/relayed, feedback outcomes), read by one
``twisted.logger`` observer, so no room knows about metrics. Messages accepted by listener
workers are counted in the main process when the queue manager is told of them (once per queue
id), so ``/metrics`` of the main process covers every listener. Gauges (queue size by state,
suppression list size, shaping pauses, outbound connections) are read when scraped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger

from pymta.interfaces import QUEUE_STATES

_DELIVERY_EVENTS = ("delivered", "deferred", "bounced", "expired", "relayed")
_CLUSTER_EVENTS = {"cluster_fallback": "local", "cluster_shared": "shared"}
log = Logger(namespace="pymta.http")
LATENCY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 5 * 86400)


def _label(value: Any, allowed: frozenset[str] | None = None) -> str:
    """A bounded label value: unknown or unlisted values collapse to "other"."""
    if not value:
        return ""
    text = str(value)[:64]
    if allowed is not None and text not in allowed:
        return "other"
    return text


class Metrics:
    """The registry and the counters; ``observe`` is the log observer that feeds them.

    ``campaign_labels``/``tenant_labels``: the campaign and tenant values that get their own
    label value (others count as "other"), to bound label cardinality; None = label not used.
    """

    def __init__(
        self,
        campaign_labels: frozenset[str] | None = None,
        tenant_labels: frozenset[str] | None = None,
        seen_limit: int = 100_000,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.campaign_labels = campaign_labels
        self.tenant_labels = tenant_labels
        r = self.registry
        self.received = Counter("pymta_messages_received", "Messages accepted into the queue", ["listener"], registry=r)
        self.deliveries = Counter(
            "pymta_delivery_results", "Per-recipient delivery outcomes",
            ["result", "pool", "source", "campaign", "tenant"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "pymta_delivery_latency_seconds", "Time from acceptance to delivery", buckets=LATENCY_BUCKETS, registry=r
        )
        self.feedback = Counter("pymta_feedback_events", "Feedback messages processed", ["kind"], registry=r)
        self.injections = Counter("pymta_injection_requests", "Injection API requests", ["outcome"], registry=r)
        self.injected = Counter("pymta_injected_recipients", "Recipients of injection requests", ["outcome"], registry=r)
        self.shaping = Counter("pymta_shaping_decisions", "Shaping pauses and rate changes", ["kind"], registry=r)
        self.dns = Counter("pymta_dns_lookups", "DNS lookups that reached a server, by result", ["rdtype", "result"],
                           registry=r)  # fmt: skip
        self.tls = Counter("pymta_outbound_tls", "Outbound delivery outcomes by TLS policy and TLS result "
                           "(tls, plaintext, failed), one per recipient", ["tls_policy", "result"], registry=r)  # fmt: skip
        self.cluster = Counter("pymta_cluster_state_changes", "Switches of the node between the cluster's shared "
                               "state (shared) and its own divided limits (local)", ["state"], registry=r)  # fmt: skip
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_limit = seen_limit
        # Called with each queue id counted as received (once per qid): the time series counts here too.
        self.on_received: list[Callable[[str], Any]] = []

    # -- feeding --------------------------------------------------------------------------

    def message_received(self, qid: str, listener: str = "smtp") -> None:
        """Once per queue id, however many times the queue manager hears of it."""
        if qid in self._seen:
            return
        self._seen[qid] = None
        if len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)
        self.received.labels(listener).inc()
        for call in self.on_received:
            try:
                call(qid)
            except Exception:
                log.failure("counting {qid} as received failed", qid=qid)

    def counting(self, notify: Callable[[str], Any] | None, listener: str = "smtp") -> Callable[[str], Any]:
        """Wraps the queue manager's notification so every message is counted once."""

        def notified(qid: str) -> Any:
            self.message_received(qid, listener)
            return notify(qid) if notify is not None else None

        return notified

    def observe(self, event: dict[str, Any]) -> None:
        """A ``twisted.logger`` observer; must never raise."""
        try:
            namespace = event.get("log_namespace", "")
            kind = event.get("event")
            if namespace == "pymta.queue" and kind in _DELIVERY_EVENTS:
                self.deliveries.labels(
                    kind, _label(event.get("pool")), _label(event.get("source")),
                    _label(event.get("campaign"), self.campaign_labels) if self.campaign_labels is not None else "",
                    _label(event.get("tenant"), self.tenant_labels) if self.tenant_labels is not None else "",
                ).inc()  # fmt: skip
                if kind == "delivered" and isinstance(event.get("queue_time"), int | float):
                    self.latency.observe(max(0.0, float(event["queue_time"])))
                if event.get("tls_policy"):
                    tls = "tls" if event.get("tls") else ("failed" if event.get("tls_failure") else "plaintext")
                    self.tls.labels(_label(event["tls_policy"]), tls).inc()
            elif namespace == "pymta.dns" and kind == "dns_lookup":
                self.dns.labels(_label(event.get("rdtype")), _label(event.get("result"))).inc()
            elif namespace == "pymta.feedback" and event.get("kind"):
                self.feedback.labels(_label(event.get("kind"))).inc()
            elif namespace == "pymta.state.cluster" and kind in _CLUSTER_EVENTS:
                self.cluster.labels(_CLUSTER_EVENTS[kind]).inc()
            elif namespace == "pymta.outbound.shaping" and kind:
                self.shaping.labels(_label(kind)).inc()
        except Exception:  # an observer that raises would be removed by the publisher
            pass

    def injected_result(self, result: Any) -> Any:
        """Counts one injection request's outcome; passes the result (or failure) on."""
        if isinstance(result, dict):
            self.injections.labels("ok").inc()
            self.injected.labels("queued").inc(result.get("success_count", 0))
            self.injected.labels("failed").inc(result.get("fail_count", 0))
        else:
            self.injections.labels("error").inc()
        return result

    def add_gauges(self, read: Callable[[], dict[str, Any]]) -> None:
        """Gauges computed at scrape time by ``read()``: {"queue": {state: n}, "suppressions": n,
        "paused_destinations": n, "connections": {(provider, source): n}, "suspensions": {kind: n}}."""
        self.registry.register(_ScrapeCollector(read))


class _ScrapeCollector:
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        try:
            values = self.read()
        except Exception:
            values = {}
        queue = GaugeMetricFamily("pymta_queue_messages", "Messages in the queue by state", labels=["state"])
        for state in QUEUE_STATES:
            queue.add_metric([state], float((values.get("queue") or {}).get(state, 0)))
        yield queue
        if "suppressions" in values:
            yield GaugeMetricFamily("pymta_suppressions", "Entries in the suppression list", value=values["suppressions"])
        if "paused_destinations" in values:
            yield GaugeMetricFamily("pymta_shaping_paused_destinations", "Destinations paused by shaping now",
                                    value=values["paused_destinations"])  # fmt: skip
        if "webhooks" in values:
            backlog = GaugeMetricFamily("pymta_webhook_backlog", "Events not yet accepted by a webhook endpoint",
                                        labels=["webhook"])  # fmt: skip
            dropped = CounterMetricFamily("pymta_webhook_dropped", "Events a webhook endpoint never accepted",
                                          labels=["webhook"])  # fmt: skip
            delivered = CounterMetricFamily("pymta_webhook_delivered", "Events accepted by a webhook endpoint",
                                            labels=["webhook"])  # fmt: skip
            for hook in values["webhooks"]:
                backlog.add_metric([_label(hook["name"])], float(hook["backlog"]))
                dropped.add_metric([_label(hook["name"])], float(hook["dropped"]))
                delivered.add_metric([_label(hook["name"])], float(hook["delivered"]))
            yield backlog
            yield dropped
            yield delivered
        connections = GaugeMetricFamily("pymta_outbound_connections", "Outbound connections delivering now",
                                        labels=["provider", "source"])  # fmt: skip
        for (provider, source), n in sorted((values.get("connections") or {}).items()):
            connections.add_metric([_label(provider), _label(source)], float(n))
        yield connections
        if "suspensions" in values:
            suspended = GaugeMetricFamily("pymta_suspensions", "Operator suspensions in force", labels=["kind"])
            for kind, n in sorted(values["suspensions"].items()):
                suspended.add_metric([kind], float(n))
            yield suspended
