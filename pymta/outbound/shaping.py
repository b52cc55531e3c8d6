"""How fast: per-destination limits (default -> provider -> domain) and backoff on pushback.

A destination is a provider when its MX hosts end in one of the provider's suffixes (all domains
hosted by Google share Google's limits), else the recipient domain. Limits: connections,
message rate (GCRA with burst), messages per connection. Backoff rules match the whole reply line;
a match pauses the destination, then lets it resume at a share of its rate that climbs back to
the full rate over ``recover``. Every decision is logged with its reason. In a cluster a pause
(pushback or dead site) is stored in the shared state with its expiry and applied by every node;
an operator's resume lifts it everywhere.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer, task
from twisted.logger import Logger

from pymta.rate import KeyedLimiter, Rate, parse_rate, parse_share, parse_window
from pymta.state.cluster import LeaseKeeper
from pymta.wordings import wordings

log = Logger(namespace="pymta.outbound.shaping")


@dataclass(frozen=True)
class Limits:
    connections: int | None = None
    message_rate: Rate | None = None
    messages_per_connection: int | None = None
    recipients_per_message: int | None = None
    window: tuple[int, int] | None = None  # minutes after local midnight: [start, end)
    timezone: str | None = None
    connection_rate: Rate | None = None
    retry: tuple[float, float] | None = None  # (initial, maximum) retry delays for this destination
    per_source: bool | None = None  # the limits apply to each source IP separately
    dead_site_pause: float | None = None  # suspension after DEAD_SITE_FAILURES failures in a row (0: none)

    def over(self, other: Limits) -> Limits:
        """These limits, falling back to ``other`` where unset."""
        names = ("connections", "message_rate", "messages_per_connection", "recipients_per_message", "window", "timezone",
                 "connection_rate", "retry", "per_source", "dead_site_pause")  # fmt: skip
        return Limits(*(getattr(self, n) if getattr(self, n) is not None else getattr(other, n) for n in names))


@dataclass(frozen=True)
class BackoffRule:
    match: re.Pattern[str]
    pause: float
    share: float  # resume at this share of the rate
    recover: float  # ... and climb back to the full rate over this period


# Shipped defaults for common provider pushback (data in pymta/wordings.toml); configured rules come first.
DEFAULT_BACKOFF = tuple(BackoffRule(b.match, b.pause, b.share, b.recover) for b in wordings().backoff)


INITIAL_WINDOW = 2  # connections a destination starts with
DEAD_SITE_FAILURES = 5  # connection-level failures in a row that suspend a destination ...
DEAD_SITE_PAUSE = 600.0  # ... for this long, unless the limits say otherwise
MAX_REMEMBERED_DOMAINS = 65536  # recipient domain -> destination key, for operator commands
LEASE_TTL = 30.0  # a shared connection lease lapses this long after its node stops refreshing it
LEASE_RETRY = 0.25  # seconds between tries for a shared connection slot
UNCAPPED = 10_000  # the connection cap of a destination whose limits set none


@dataclass
class State:
    """What pushback did to one destination."""

    paused_until: float = 0.0
    resumed_at: float = 0.0
    share: float = 1.0
    recover: float = 0.0
    reason: str = ""
    connections: int = 0
    waiting: list[defer.Deferred[Any]] = field(default_factory=list)
    window: float = 0.0  # adaptive concurrency (0: not started yet)
    limits: Limits | None = None
    failures: int = 0  # connection-level failures in a row
    stamp: float = 0.0  # when the pause in force was decided (on this node or another)
    in_cluster: bool = False  # the pause in force is in the cluster's shared table
    unpublished: bool = False  # a pause or resume decided here that the cluster's table does not have yet


class Shaper:
    def __init__(
        self,
        clock: Any,
        default: Limits,
        domains: dict[str, Limits] | None = None,
        providers: dict[str, tuple[tuple[str, ...], Limits]] | None = None,
        backoff: tuple[BackoffRule, ...] = (),
        cluster: Any = None,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self.clock = clock
        self.cluster = cluster  # IClusterState: rates and connection caps shared by the nodes
        self.lease_ttl = lease_ttl
        self.leases = LeaseKeeper(cluster, clock, lease_ttl) if cluster is not None else None
        self.default = default
        self.domains = {k.lower(): v for k, v in (domains or {}).items()}
        self.providers = providers or {}
        self.backoff = tuple(backoff) + DEFAULT_BACKOFF
        self.states: dict[str, State] = {}
        self.limiters: dict[str, KeyedLimiter] = {}
        self._key_of_domain: OrderedDict[str, str] = OrderedDict()  # most recently used last
        self.suspensions: Any = None  # ISuspensions: the operator's suspensions, when configured
        if cluster is not None:
            cluster.watch("pauses", self.apply_shared_pauses)

    def _remember(self, domain: str, key: str) -> None:
        self._key_of_domain[domain] = key
        self._key_of_domain.move_to_end(domain)
        if len(self._key_of_domain) > MAX_REMEMBERED_DOMAINS:
            self._key_of_domain.popitem(last=False)

    def keys_for(self, domain: str) -> list[str]:
        """The destination keys (with their per-source variants) that mail for ``domain`` went through."""
        domain = domain.lower().rstrip(".")
        bases = {f"domain:{domain}", self._key_of_domain.get(domain, f"domain:{domain}")}
        return sorted(k for k in self.states if k in bases or k.partition("@")[0] in bases)

    # -- destinations ---------------------------------------------------------------------

    def destination(self, domain: str, mx_hosts: tuple[str, ...] = ()) -> tuple[str, Limits]:
        """The key limits are kept under, and the limits that apply to it."""
        domain = domain.lower()
        for name, (suffixes, limits) in self.providers.items():
            if any(h == s or h.endswith("." + s) for h in mx_hosts for s in suffixes):
                own = self.domains.get(domain)
                self._remember(domain, f"provider:{name}")
                return f"provider:{name}", (own.over(limits) if own else limits).over(self.default)
        own = self.domains.get(domain)
        if own is not None or not mx_hosts:
            return f"domain:{domain}", (own.over(self.default) if own else self.default)
        # Domains hosted on the same MX hosts share one destination (automatic rollup).
        key = "mx:" + ",".join(sorted(set(mx_hosts)))
        self._remember(domain, key)
        return key, self.default

    def state(self, key: str) -> State:
        s = self.states.get(key)
        if s is None:
            s = self.states[key] = State()
        return s

    def current_rate(self, key: str, limits: Limits) -> Rate | None:
        rate = limits.message_rate
        if rate is None:
            return None
        s = self.state(key)
        now = self.clock.seconds()
        if s.share >= 1.0 or s.recover <= 0:
            return rate
        progress = min(1.0, max(0.0, (now - s.resumed_at) / s.recover))
        share = s.share + (1.0 - s.share) * progress
        if share >= 1.0:
            s.share = 1.0
        return rate.scaled(share)

    def suspended(self, domain: str, provider: str | None, source: Any, envelope: Any) -> dict[str, Any] | None:
        """The operator's suspension that holds this mail (by domain, provider, source, campaign or
        tenant), or None."""
        if self.suspensions is None:
            return None
        extra = getattr(envelope, "extra", None) or {}
        found = self.suspensions.match(domain=domain, provider=provider, source=getattr(source, "name", None),
                                       campaign=extra.get("campaign"), tenant=extra.get("tenant"))  # fmt: skip
        return cast("dict[str, Any] | None", found)

    # -- admission ------------------------------------------------------------------------

    def _held(self, key: str, limits: Limits) -> float:
        """When a pause or the delivery window lets the destination go again (0: now)."""
        s = self.state(key)
        now = self.clock.seconds()
        if s.paused_until > now:
            return s.paused_until
        return next_window_start(now, limits)

    def admit(self, key: str, limits: Limits) -> defer.Deferred[Any]:
        """:meth:`hold_until`, with the rate taken from the cluster's shared state when there is one."""
        if self.cluster is None:
            return defer.succeed(self.hold_until(key, limits))
        held = self._held(key, limits)
        rate = None if held else self.current_rate(key, limits)
        if held or rate is None:
            return defer.succeed(held)
        d = self.cluster.take("rate:" + key, key, rate)
        return cast("defer.Deferred[Any]", d.addCallback(lambda wait: self.clock.seconds() + wait if wait else 0.0))

    def hold_until(self, key: str, limits: Limits) -> float:
        """0 if a message may go now (and takes its rate token); else when to try again."""
        held = self._held(key, limits)
        if held:
            return held
        rate = self.current_rate(key, limits)
        if rate is None:
            return 0.0
        now = self.clock.seconds()
        limiter = self.limiters.get(key)
        if limiter is None:
            limiter = self.limiters[key] = KeyedLimiter(rate, self.clock)
        limiter.set_rate(rate)
        wait = limiter.take(key)
        return now + wait if wait else 0.0

    def connection_wait(self, key: str, limits: Limits) -> Any:
        """Seconds to wait before opening a new connection to the destination (its connection rate);
        in a cluster, a Deferred of them."""
        if limits.connection_rate is None:
            return 0.0
        if self.cluster is not None:
            return self.cluster.take("conn_rate:" + key, key, limits.connection_rate)
        limiter = self.limiters.get("conn:" + key)
        if limiter is None:
            limiter = self.limiters["conn:" + key] = KeyedLimiter(limits.connection_rate, self.clock)
        return limiter.take(key)

    def _cap(self, s: State, limits: Limits) -> int:
        """Concurrency now: the adaptive window within the configured cap (Postfix-style slow start)."""
        cap = limits.connections if limits.connections is not None else UNCAPPED
        if s.window <= 0:
            s.window = float(min(INITIAL_WINDOW, cap))
        return max(1, min(cap, int(s.window)))

    def acquire_connection(self, key: str, limits: Limits) -> defer.Deferred[Any]:
        """Fires when the destination has a free connection slot (FIFO), and, in a cluster, one
        of the cluster's ``connections`` for the destination (the adaptive window stays per node)."""
        s = self.state(key)
        s.limits = limits
        if s.connections < self._cap(s, limits):
            s.connections += 1
            d: defer.Deferred[Any] = defer.succeed(None)
        else:
            d = defer.Deferred()
            s.waiting.append(d)
        if self.cluster is not None and limits.connections is not None:
            cap = limits.connections  # Limits is frozen
            d.addCallback(lambda _: self._lease(key, cap))
        return d

    @defer.inlineCallbacks
    def _lease(self, key: str, cap: int) -> Any:
        while not (yield cast(LeaseKeeper, self.leases).acquire("conn:" + key, cap)):  # set with the cluster
            yield task.deferLater(self.clock, LEASE_RETRY, lambda: None)

    def release_connection(self, key: str) -> None:
        s = self.state(key)
        s.connections = max(0, s.connections - 1)
        if self.leases is not None:
            self.leases.release("conn:" + key)
        self._wake(s)

    def stop(self) -> None:
        if self.leases is not None:
            self.leases.stop()

    def _wake(self, s: State) -> None:
        cap = self._cap(s, s.limits or self.default)
        while s.waiting and s.connections < cap:
            s.connections += 1
            s.waiting.pop(0).callback(None)

    # -- adaptive concurrency and dead sites ------------------------------------------------

    def success(self, key: str) -> None:
        """A delivery went through: one more concurrent connection allowed (additive increase)."""
        s = self.state(key)
        s.failures = 0
        cap = (s.limits or self.default).connections or UNCAPPED
        s.window = min(float(cap), (s.window or INITIAL_WINDOW) + 1.0)
        self._wake(s)

    def congestion(self, key: str, why: str) -> None:
        """421, timeouts, refused connections: halve the concurrency (multiplicative decrease)."""
        s = self.state(key)
        before = s.window or INITIAL_WINDOW
        s.window = max(1.0, before / 2)
        if s.window < before:
            log.info("{key}: concurrency {before:g} -> {after:g} ({why})", key=key, before=before, after=s.window, why=why)

    def connection_failed(self, key: str, why: str) -> None:
        s = self.state(key)
        s.failures += 1
        self.congestion(key, why)
        pause = (s.limits or self.default).dead_site_pause
        pause = DEAD_SITE_PAUSE if pause is None else pause
        if s.failures >= DEAD_SITE_FAILURES and pause > 0:
            now = self.clock.seconds()
            s.paused_until = max(s.paused_until, now + pause)
            s.resumed_at, s.share, s.recover = s.paused_until, 1.0, 0.0
            s.reason = f"dead site: {s.failures} connection failures in a row, last: {why}"[:200]
            s.failures = 0
            log.warn("suspending {key} for {pause:g}s: {why}", key=key, pause=pause, why=s.reason,
                     event="shaping_pause")  # fmt: skip
            self._share_pause(key, s)

    def resume(self, keys: list[str] | None = None) -> list[str]:
        """Lift pauses, dead-site suspensions and reduced rates (of ``keys``, or of every destination),
        as an operator's flush asks; the keys that were held back."""
        resumed = []
        for key in self.states if keys is None else keys:
            s = self.states.get(key)
            if s is None:
                continue
            held = s.paused_until > self.clock.seconds() or s.share < 1.0
            s.paused_until, s.resumed_at, s.share, s.recover, s.failures = 0.0, 0.0, 1.0, 0.0, 0
            s.stamp, s.in_cluster = self.clock.seconds(), False
            if self.cluster is not None:
                self._publish_pause(key, s)
            if held:
                resumed.append(key)
                log.info("resuming {key} (operator flush; was: {why})", key=key, why=s.reason or "slowed",
                         event="shaping_resume")  # fmt: skip
                s.reason = ""
        return resumed

    # -- pushback -------------------------------------------------------------------------

    def observe(self, key: str, code: int, enhanced: str, text: str) -> bool:
        """Feed a reply; True when a backoff rule paused the destination."""
        if code < 400 or code >= 500:
            return False
        line = f"{code} {enhanced} {text}".strip()
        for rule in self.backoff:
            if rule.match.search(line):
                now = self.clock.seconds()
                s = self.state(key)
                s.paused_until = now + rule.pause
                s.resumed_at = s.paused_until
                s.share = rule.share
                s.recover = rule.recover
                s.reason = line[:200]
                log.warn("pausing {key} for {pause:g}s, then {share:.0%} of its rate: {why}", key=key, pause=rule.pause,
                         share=rule.share, why=s.reason, event="shaping_pause")  # fmt: skip
                self._share_pause(key, s)
                return True
        return False

    # -- pauses shared by the nodes of a cluster ----------------------------------------------

    def _share_pause(self, key: str, s: State) -> None:
        """Store the pause of ``key`` in the cluster until its rate has fully recovered."""
        s.stamp, s.in_cluster = self.clock.seconds(), False
        if self.cluster is not None:
            self._publish_pause(key, s)

    def _publish_pause(self, key: str, s: State) -> None:
        """Put the pause decided here in the cluster's table (or delete it there: resumed); until
        the table has it, it stays ``unpublished`` and is published again when the shared state
        is read back (Redis returned) without it."""
        stamp, pausing = s.stamp, _pause_ends(s) > self.clock.seconds()
        s.unpublished = True

        def stored(ok: bool) -> None:
            if ok and s.stamp == stamp:
                s.in_cluster, s.unpublished = pausing, False

        if not pausing:
            self.cluster.delete_record("pauses", key).addCallback(stored)
            return
        record = {"paused_until": s.paused_until, "resumed_at": s.resumed_at, "share": s.share, "recover": s.recover,
                  "reason": s.reason, "stamp": stamp, "node": self.cluster.node}  # fmt: skip
        self.cluster.put_record("pauses", key, record, _pause_ends(s)).addCallback(stored)

    def apply_shared_pauses(self, records: dict[str, dict[str, Any]]) -> None:
        """The cluster's pauses in force (from the shared state): newer ones are applied here; a
        pause stored there and gone from it was lifted by an operator (or has run its course); a
        pause or resume decided here while the shared state was away, and newer than the
        cluster's, is published."""
        now = self.clock.seconds()
        for key, r in records.items():
            s = self.states.get(key)
            try:
                stamp = float(r["stamp"])
                if s is not None and stamp <= s.stamp:
                    if stamp == s.stamp and s.unpublished:  # stored, though the answer was lost
                        s.in_cluster, s.unpublished = True, False
                    elif s.unpublished:  # decided here while away, after the cluster's
                        self._publish_pause(key, s)
                    continue
                values = (float(r["paused_until"]), float(r["resumed_at"]), float(r["share"]), float(r["recover"]))
            except (KeyError, TypeError, ValueError):
                continue
            s = s or self.state(key)
            s.paused_until, s.resumed_at, s.share, s.recover = values
            s.reason, s.stamp, s.in_cluster, s.unpublished = str(r.get("reason", ""))[:200], stamp, True, False
            log.warn("pausing {key} until {until:.0f}, then {share:.0%} of its rate, as node {node} decided: {why}",
                     key=key, until=s.paused_until, share=s.share, node=str(r.get("node", "?"))[:64], why=s.reason,
                     event="shaping_pause_shared")  # fmt: skip
        for key, s in self.states.items():
            if s.unpublished and key not in records:
                if _pause_ends(s) > now:
                    self._publish_pause(key, s)
                else:
                    s.unpublished = False  # resumed, and the cluster holds no pause of it either
            elif s.in_cluster and key not in records:
                s.paused_until, s.resumed_at, s.share, s.recover, s.in_cluster = 0.0, 0.0, 1.0, 0.0, False
                log.info("resuming {key}: its pause was lifted in the cluster", key=key, event="shaping_resume")

    def explain(self, key: str) -> dict[str, Any]:
        s = self.state(key)
        return {"key": key, "paused_until": s.paused_until, "share": s.share, "reason": s.reason,
                "connections": s.connections, "waiting": len(s.waiting)}  # fmt: skip


def _pause_ends(s: State) -> float:
    """When a pause and the reduced rate after it are over (how long the cluster keeps it)."""
    return max(s.paused_until, s.resumed_at + s.recover)


def next_window_start(now: float, limits: Limits) -> float:
    """0 when ``now`` is inside the destination's delivery window (or it has none); else when it opens."""
    if limits.window is None:
        return 0.0
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(limits.timezone or "UTC")
    local = datetime.fromtimestamp(now, tz)
    minute = local.hour * 60 + local.minute
    start, end = limits.window
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return 0.0
    opening = local.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
    if opening <= local:
        opening += timedelta(days=1)
    return opening.timestamp()


__all__ = ["DEFAULT_BACKOFF", "BackoffRule", "Limits", "Shaper", "parse_rate", "parse_share", "parse_window"]
