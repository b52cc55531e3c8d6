"""Outbound delivery over SMTP: next hops tried in order, connection caps, connection reuse,
opportunistic or verified STARTTLS, DANE, MTA-STS and REQUIRETLS, and a result per recipient with
its enhanced status code.

The TLS policy is decided per MX host (a :class:`HopPlan`): DANE where the host has DNSSEC-validated
TLSA records, else the domain's MTA-STS policy, else the configured policy (``[outbound] tls``);
REQUIRETLS (RFC 8689) on top demands a verified session with a hop that offers REQUIRETLS; a
``TLS-Required: No`` header takes the message back to opportunistic TLS.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer, endpoints, error, protocol, task
from twisted.logger import Logger
from zope.interface import implementer

from pymta.envelope import DEFERRED, DELIVERED, FAILED, RELAYED, DeliveryResult, Envelope, Recipient
from pymta.interfaces import IDeliveryAgent
from pymta.log import debug
from pymta.outbound.requiretls import requiretls_of, tls_optional
from pymta.outbound.routes import Hop, RouteError, Router
from pymta.outbound.shaping import UNCAPPED, Limits, Shaper
from pymta.smtp.client import (
    ClientTimeouts,
    SessionRefused,
    SMTPClientProtocol,
    mail_command,
    quit_session,
    transact,
)
from pymta.smtp.content import encode_data
from pymta.smtp.replies import Reply
from pymta.smtp.syntax import xtext_encode
from pymta.state.suspensions import SUSPENDED_TEXT

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocolFactory

log = Logger(namespace="pymta.outbound")

SHARED_SLOT_JITTER = 0.05  # seconds, at most, added to a wait for a cluster-wide rate token
MAX_INLINE_WAIT = 2.0  # a shaping wait longer than this goes back to the queue instead
NO_TLS_MEMORY = 3600.0  # a host whose STARTTLS failed is tried in plaintext for this long
TLS_POLICIES = ("none", "opportunistic", "verify", "dane")
INTERRUPTED = Reply(451, "4.3.2", "Delivery interrupted: the MTA is shutting down; will retry")


class ConnectFailed(Exception):
    """No SMTP session with this address (connect, greeting, EHLO or TLS): try the next one."""

    def __init__(self, reply: Reply, tls_failed: bool = False, result_type: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.tls_failed = tls_failed
        self.result_type = result_type  # RFC 8460, when TLS is why


@dataclass(frozen=True)
class PoolKey:
    """What an idle connection can be reused for: the peer and source, the TLS policy it was
    opened under, and the name its certificate was verified for (None when not verified)."""

    address: str
    port: int
    source: str
    tls: str
    verified: str | None = None


def reusable_keys(address: str, port: int, source: str, policy: str, host: str) -> list[PoolKey]:
    """Idle sessions that satisfy ``policy`` for the MX ``host``, best first: a ``verify`` message
    takes only a session verified for ``host``, a ``dane`` one only a session whose certificate
    matched the host's TLSA records; an opportunistic one never takes a session opened in
    plaintext by a ``none`` policy (it may have had TLS); ``none`` takes any."""
    verified = PoolKey(address, port, source, "verify", host)
    if policy == "verify":
        return [verified]
    if policy == "dane":
        return [PoolKey(address, port, source, "dane", host)]
    opportunistic = PoolKey(address, port, source, "opportunistic")
    if policy == "opportunistic":
        return [opportunistic, verified]
    return [PoolKey(address, port, source, "none"), opportunistic, verified]


class _OneConnection(protocol.Factory):
    """Builds the one given protocol for one outbound connection, quietly: no "Starting factory" /
    "Stopping factory" lines per connection (``endpoints.connectProtocol``'s factory logs them)."""

    noisy = False

    def __init__(self, proto: SMTPClientProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self.proto


@dataclass
class Session:
    proto: SMTPClientProtocol
    key: PoolKey
    host: str
    messages: int = 0
    idle_call: Any = None
    helo: str = ""
    idle_cap: int | None = None  # idle connections kept for its pool key: its destination's connection cap

    @property
    def remote(self) -> str:
        return f"{self.host} [{self.key.address}]"


@dataclass(frozen=True)
class HopPlan:
    """How one MX host is to be used: the session policy (none / opportunistic / verify / dane), the
    label for the accounting record, the DANE facts of the host, and why it is not to be used."""

    hop: Hop
    policy: str
    label: str
    dane: Any = None  # pymta.outbound.dane.DANEHost
    testing: Any = None  # an MTA-STS policy in testing mode (failures recorded, not enforced)
    skip: Reply | None = None
    sts: Any = None  # the domain's MTA-STS policy (CachedPolicy) this plan follows, for TLS reports


def _status(code: int) -> str:
    return DELIVERED if 200 <= code < 300 else DEFERRED if 400 <= code < 500 else FAILED


def _result(rcpt: Recipient, reply: Reply, remote: str | None, tls: str | None, **extra: Any) -> DeliveryResult:
    enhanced = reply.enhanced or {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(reply.code // 100, "")
    return DeliveryResult(rcpt.address, _status(reply.code), reply.code, enhanced, reply.text, remote, tls, extra)


@implementer(IDeliveryAgent)
class SMTPDeliveryAgent:
    """Delivers batches of recipients (one domain each) over SMTP."""

    def __init__(
        self,
        reactor: Any,
        router: Router,
        helo_name: str,
        clock: Any = None,
        max_connections: int = 100,
        max_connections_per_domain: int = 10,
        max_messages_per_connection: int = 100,
        max_recipients_per_transaction: int = 100,
        source_address: str | None = None,
        timeouts: ClientTimeouts | None = None,
        tls_policy_for: Callable[[str], str] | None = None,
        tls_context_for: Callable[[str, bool], Any] | None = None,
        idle_timeout: float = 5.0,
        shaper: Any = None,
        selector: Any = None,
        mta_sts: Any = None,
        dane: Any = None,
        tls_reports: Any = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock or reactor
        self.rng = random.Random()  # jitter of the retry for a rate token shared by a cluster
        self.router = router
        self.helo_name = helo_name
        self.max_messages_per_connection = max_messages_per_connection
        self.max_recipients = max_recipients_per_transaction
        self.source_address = source_address
        self.timeouts = timeouts or ClientTimeouts()
        self.tls_policy_for = tls_policy_for or (lambda domain: "opportunistic")
        self.tls_context_for = tls_context_for
        self.idle_timeout = idle_timeout
        # The shaper is the one authority for connection counts per destination; without one given,
        # a shaper whose only limit is ``max_connections_per_domain`` connections per domain.
        self.shaper = shaper if shaper is not None else Shaper(self.clock, Limits(connections=max_connections_per_domain))
        self.selector = selector
        self.mta_sts = mta_sts  # pymta.outbound.tlspolicy.MTASTS, or None
        self.dane = dane  # pymta.outbound.dane.DANE (needs [dns] dnssec), or None
        self.tls_reports = tls_reports  # pymta.outbound.tlsrpt.TLSReporter, or None
        self.global_slots = defer.DeferredSemaphore(max_connections)
        self.idle: dict[PoolKey, list[Session]] = {}
        self.no_tls_until: dict[str, float] = {}
        self._closing: list[defer.Deferred[Any]] = []  # connections being closed (QUIT sent)
        self._stopping = False  # set by abort_all: no new delivery, no new connection
        self._live: weakref.WeakSet[SMTPClientProtocol] = weakref.WeakSet()  # every connection made
        self._connecting: set[defer.Deferred[Any]] = set()  # connection attempts in progress
        self._calls: dict[defer.Deferred[Any], list[Recipient]] = {}  # deliveries in flight -> their recipients
        self.active: dict[tuple[str, str], int] = {}  # (provider, source) -> sessions delivering now

    # -- the IDeliveryAgent call ----------------------------------------------------------------

    def deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> defer.Deferred[Any]:
        if self._stopping:
            return defer.succeed([_result(r, INTERRUPTED, None, None) for r in recipients])
        inner = self._deliver_within_limits(envelope, recipients, body)
        if inner.called:
            return inner
        outer: defer.Deferred[Any] = defer.Deferred()
        self._calls[outer] = recipients

        def relay(result: Any) -> None:
            self._calls.pop(outer, None)
            if not outer.called:  # else abort_all already answered for these recipients
                outer.callback(result)

        inner.addBoth(relay)
        return outer

    def abort_all(self, settle: float = 1.0) -> defer.Deferred[Any]:
        """At shutdown, once the grace is over: abort every connection and attempt, and answer
        every delivery still in flight (451 4.3.2, deferred) within ``settle`` seconds.

        Aborted transactions first get ``settle`` seconds to report what they know, so a
        recipient whose 250 was already read is reported delivered, not deferred.
        """
        self._stopping = True
        for d in list(self._connecting):
            d.cancel()
        for pool in self.idle.values():
            for session in pool:
                if session.idle_call is not None and session.idle_call.active():
                    session.idle_call.cancel()
        self.idle.clear()
        for proto in list(self._live):
            proto.abort()
        if self._calls:
            log.warn("aborting {n} delivery attempt(s) in flight", n=len(self._calls), event="shutdown")

        def answer_the_rest() -> None:
            for outer, recipients in list(self._calls.items()):
                self._calls.pop(outer, None)
                if not outer.called:
                    outer.callback([_result(r, INTERRUPTED, None, None) for r in recipients])

        return task.deferLater(self.clock, settle, answer_the_rest)

    @defer.inlineCallbacks
    def _deliver_within_limits(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> Any:
        yield self.global_slots.acquire()  # per destination, the shaper counts connections
        try:
            results = yield self._deliver(envelope, recipients, body, recipients[0].domain)
        finally:
            self.global_slots.release()
        return results

    @defer.inlineCallbacks
    def _deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes, domain: str) -> Any:
        try:
            hops: list[Hop] = yield self.router.next_hops(domain)
        except RouteError as e:
            return [_result(r, e.reply, None, None) for r in recipients]
        destination = self.shaper.destination(domain, tuple(h.name for h in hops))
        provider = destination[0][len("provider:") :] if destination and destination[0].startswith("provider:") else None
        source = None
        if self.selector is not None:
            source, until = yield self.selector.pick(envelope, provider)  # in a cluster, a Deferred
            if source is None and until:
                reply = Reply(451, "4.7.0", "Every source of this mail's pool reached its daily warm-up cap")
                return [_result(r, reply, None, None, hold_until=until) for r in recipients]
        sent = False  # a source's place under the cluster's warm-up caps is given back unless used
        try:
            suspended = self.shaper.suspended(domain, provider, source, envelope)
            if suspended is not None:  # an operator's suspension: back to the queue without using an attempt
                reply = Reply(451, "4.7.0", f"{SUSPENDED_TEXT} until it lapses ({suspended['reason']})")
                return [_result(r, reply, None, None, hold_until=suspended["until"]) for r in recipients]
            shaping = None
            if destination is not None:
                key, limits = destination
                if limits.per_source and source is not None:
                    key = f"{key}@{source.name}"  # the limits hold for each source separately
                while True:
                    hold = yield self.shaper.admit(key, limits)
                    wait = hold - self.clock.seconds() if hold else 0.0
                    if wait <= 0:
                        break
                    if wait > MAX_INLINE_WAIT:  # held by a limit: back to the queue without using an attempt
                        why = self.shaper.state(key).reason or f"rate limit of {key}"
                        reply = Reply(451, "4.7.0", f"Held back by traffic shaping ({why})")
                        return [_result(r, reply, None, None, hold_until=hold, shaping=key) for r in recipients]
                    if getattr(self.shaper, "cluster", None) is not None:
                        # Every node is told the same next free slot: a little jitter lets a
                        # different one win each time, so no node starves behind the others.
                        wait += self.rng.uniform(0.0, SHARED_SLOT_JITTER)
                    yield task.deferLater(self.clock, wait, lambda: None)
                yield self.shaper.acquire_connection(key, limits)
                shaping = (key, limits)
            active = (provider or "", getattr(source, "name", "") or "")
            self.active[active] = self.active.get(active, 0) + 1
            try:
                results = yield self._try_hops(envelope, recipients, body, domain, hops, shaping, source)
                if provider is not None:  # for the accounting record and the event
                    for r in results:
                        r.extra.setdefault("provider", provider)
                if source is not None:
                    for r in results:
                        if r.remote_mta:  # an answer from the remote side, not a local verdict
                            self.selector.outcome(source, r.code)
                    if any(200 <= r.code < 300 for r in results):
                        self.selector.sent(source, qid=envelope.qid, provider=provider)
                        sent = True
                        envelope.extra["source"] = source.name
            finally:
                self.active[active] -= 1
                if not self.active[active]:
                    del self.active[active]
                if shaping is not None:
                    self.shaper.release_connection(shaping[0])
        finally:
            if source is not None and not sent:
                self.selector.unused(source, provider)
        return results

    def _try_hops(self, envelope: Envelope, recipients: list[Recipient], body: bytes, domain: str,
                  hops: list[Hop], shaping: tuple[str, Any] | None, source: Any = None) -> defer.Deferred[Any]:  # fmt: skip
        def planned(plan: tuple[Any, str]) -> defer.Deferred[Any]:
            plans, label = plan

            def labelled(results: list[DeliveryResult]) -> list[DeliveryResult]:
                for r in results:
                    r.extra.setdefault("tls_policy", label)
                return results

            return self._hops_in_turn(envelope, recipients, body, domain, plans, shaping, source, label).addCallback(labelled)

        return self._plan(envelope, body, domain, hops).addCallback(planned)

    @defer.inlineCallbacks
    def _plan(self, envelope: Envelope, body: bytes, domain: str, hops: list[Hop]) -> Any:
        """(the :class:`HopPlan` of each hop, the label of the policy that governs the message)."""
        base = self.tls_policy_for(domain)
        requiretls = requiretls_of(envelope)
        if not requiretls and tls_optional(body):
            # RFC 8689 §5: the sender asked that the recipient's TLS policies be ignored.
            policy = "none" if base == "none" else "opportunistic"
            log.info("{qid} carries TLS-Required: No: {policy} TLS, MTA-STS and DANE not applied", qid=envelope.qid,
                     policy=policy, event="tls_required_no")  # fmt: skip
            return [HopPlan(h, policy, policy) for h in hops], policy
        uses_mx = self.router.uses_mx(domain)
        dane_hosts: dict[str, Any] = {}
        if self.dane is not None and uses_mx and (yield self.dane.domain_secure(domain)):
            for hop in hops:
                found = yield self.dane.host(hop.name)  # _25._tcp: the SMTP port of MX hosts (§2.2.3)
                if found is not None:
                    dane_hosts[hop.name] = found
        sts = None
        if self.mta_sts is not None and uses_mx:
            sts = yield self.mta_sts.policy_for(domain)
        label = "requiretls" if requiretls else "dane" if dane_hosts else "mta-sts" if sts is not None else base
        if sts is not None:
            skipped = [h.name for h in hops if h.name not in dane_hosts and not sts.policy.matches(h.name)]
            if skipped:
                log.info("MTA-STS ({mode}) of {domain}: MX {skipped} not in the policy's mx {mx}", mode=sts.policy.mode,
                         domain=domain, skipped=skipped, mx=list(sts.policy.mx), event="mta_sts_mx_mismatch")  # fmt: skip
        plans = []
        for hop in hops:
            found = dane_hosts.get(hop.name)
            if found is not None:  # DANE precedes MTA-STS (RFC 8461 §2)
                skip = Reply(451, "4.7.5", f"dnssec-invalid: {found.failure}") if found.failure else None
                plan = HopPlan(hop, "dane", "dane", found, skip=skip)
            elif sts is not None and sts.policy.mode == "enforce":
                skip = None if sts.policy.matches(hop.name) else Reply(
                    451, "4.7.5", f"MX {hop.name} of {domain} is not in its MTA-STS policy (mx: {', '.join(sts.policy.mx)})")
                plan = HopPlan(hop, "verify", "mta-sts", skip=skip, sts=sts)  # TLS required, verified for the MX name
            elif sts is not None:
                plan = HopPlan(hop, base, "mta-sts", testing=sts, sts=sts)
            else:
                plan = HopPlan(hop, base, base)
            if requiretls:  # verified by the TLSA records, else PKIX for the MX name
                dane_ok = plan.policy == "dane" and bool(plan.dane.records)
                plan = HopPlan(hop, "dane" if dane_ok else "verify", "requiretls", plan.dane if dane_ok else None,
                               skip=plan.skip)  # fmt: skip
            plans.append(plan)
        if sts is not None and sts.policy.mode == "enforce" and all(p.skip is not None for p in plans) and not dane_hosts:
            reply = Reply(451, "4.7.5", f"No MX host of {domain} matches its MTA-STS policy "
                                        f"(mx: {', '.join(sts.policy.mx)}); not delivered")  # fmt: skip
            plans = [HopPlan(p.hop, p.policy, p.label, skip=reply) for p in plans]
        return plans, label

    @defer.inlineCallbacks
    def _hops_in_turn(self, envelope: Envelope, recipients: list[Recipient], body: bytes, domain: str,
                      plans: list[HopPlan], shaping: tuple[str, Any] | None, source: Any, label: str) -> Any:  # fmt: skip
        last = Reply(451, "4.4.1", "No mail exchanger could be reached")
        requiretls = requiretls_of(envelope)
        for plan in plans:
            hop = plan.hop
            if plan.skip is not None:
                last = plan.skip
                if plan.sts is not None or plan.dane is not None:
                    self._report(plan, domain, "", plan.skip.text)
                log.info("{mx} not used for {domain}: {why}", mx=hop.name, domain=domain, why=str(plan.skip),
                         tls_policy=plan.label, event="tls_policy_skip")  # fmt: skip
                continue
            for address in hop.addresses:
                try:
                    session = yield self._session(hop, address, plan.policy, source, shaping, plan.dane)
                except ConnectFailed as e:
                    if self._stopping:
                        return [_result(r, INTERRUPTED, None, None) for r in recipients]
                    if plan.label in ("mta-sts", "dane", "requiretls") and plan.policy in ("verify", "dane") \
                            and e.reply.enhanced.startswith("4.7."):  # fmt: skip
                        why = {"mta-sts": f"MTA-STS policy of {domain}", "dane": f"DANE TLSA records of {hop.name}",
                               "requiretls": "REQUIRETLS"}[plan.label]  # fmt: skip
                        e.reply = Reply(451, "4.7.5", f"{why} requires verified TLS: {e.reply.text}")
                    last = e.reply
                    if e.result_type is not None:
                        self._report(plan, domain, address, e.result_type)
                    if shaping is not None:
                        self.shaper.observe(shaping[0], e.reply.code, e.reply.enhanced, e.reply.text)
                        self.shaper.connection_failed(shaping[0], str(e.reply))
                    log.info("{mx} [{ip}] unusable for {domain}: {why}", mx=hop.name, ip=address, domain=domain,
                             why=str(e.reply), code=e.reply.code, enhanced=e.reply.enhanced,
                             tls_policy=plan.label)  # fmt: skip
                    continue
                if requiretls and not (session.proto.tls_verified and session.proto.extensions.has("REQUIRETLS")):
                    last = Reply(451, "4.7.30", f"{session.remote} does not offer REQUIRETLS, which this message "
                                                "requires; not sent")  # fmt: skip
                    log.info("{mx} lacks REQUIRETLS for {qid}", mx=session.remote, qid=envelope.qid,
                             event="requiretls_unsupported")  # fmt: skip
                    self._release(session)
                    continue
                problem = self._testing_problem(plan.testing, session, domain) if plan.testing is not None else None
                self._report(plan, domain, address, problem, success=problem is None)
                per_connection = shaping[1].messages_per_connection if shaping is not None else None
                session.idle_cap = shaping[1].connections if shaping is not None else None
                per_message = shaping[1].recipients_per_message if shaping is not None else None
                results = yield self._send(session, envelope, recipients, body, per_connection, per_message)
                if results is not None:
                    for r in results:
                        r.extra.setdefault("tls_policy", plan.label)
                        if problem is not None:
                            r.extra["tls_failure"] = problem
                    if shaping is not None:
                        self._shaping_feedback(shaping[0], results)
                        if shaping[1].retry is not None:
                            for r in results:
                                r.extra.setdefault("retry", list(shaping[1].retry))
                    return results
                last = Reply(451, "4.4.2", f"Connection to {session.remote} lost before the transaction")
        return [_result(r, last, None, None, tls_policy=label) for r in recipients]

    def _report(self, plan: HopPlan, domain: str, address: str, result: str | None, success: bool = False) -> None:
        """Count a session for TLS reports (RFC 8460) when an MTA-STS or DANE policy governed it."""
        if self.tls_reports is None:
            return
        if plan.dane is not None:
            policy_type, strings = "tlsa", [f"{u} {s} {m} {d.hex()}" for u, s, m, d in plan.dane.records]
        elif plan.sts is not None:
            p = plan.sts.policy
            policy_type = "sts"
            strings = ["version: STSv1", f"mode: {p.mode}", *[f"mx: {m}" for m in p.mx], f"max_age: {p.max_age}"]
        else:
            return
        from pymta.outbound.tlsrpt import result_type_of

        outcome = None if success else result_type_of(result)
        self.tls_reports.session(domain, policy_type, strings, plan.hop.name, address, outcome)

    def _testing_problem(self, sts: Any, session: Session, domain: str) -> str | None:
        """MTA-STS testing mode: what enforce would have refused here, logged (for TLS reports)."""
        problem = "validation-failure" if not sts.policy.matches(session.host) else None
        problem = self.mta_sts.tls_problem(session.proto, session.host) or problem
        if problem is not None:
            log.warn("MTA-STS testing policy of {domain} would refuse {mx}: {result_type}; delivering anyway",
                     domain=domain, mx=session.remote, result_type=problem, event="mta_sts_testing_failure")  # fmt: skip
        return problem

    # -- sessions -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _session(self, hop: Hop, address: str, policy: str, source: Any = None, shaping: Any = None,
                 dane: Any = None) -> Any:  # fmt: skip
        if self._stopping:
            raise ConnectFailed(INTERRUPTED)
        source_name = source.name if source is not None else ""
        for reusable in reusable_keys(address, hop.port, source_name, policy, hop.name):
            pool = self.idle.get(reusable)
            while pool:
                session = pool.pop()
                if not pool:
                    self.idle.pop(reusable, None)
                if session.idle_call is not None and session.idle_call.active():
                    session.idle_call.cancel()
                if not session.proto.is_lost:
                    debug(log, "reusing {mx} [{ip}] for {policy} mail ({key})", mx=hop.name, ip=address, policy=policy,
                          key=reusable)  # fmt: skip
                    return session
        key = PoolKey(address, hop.port, source_name, policy)
        if shaping is not None:  # a new connection: the destination's connection rate applies
            wait = yield defer.maybeDeferred(self.shaper.connection_wait, *shaping)
            if wait > 0:
                yield task.deferLater(self.clock, wait, lambda: None)
        proto = yield self._connect(address, hop.port, source)
        session = Session(proto, key, hop.name, helo=source.ehlo if source is not None else self.helo_name)
        try:
            yield self._open(session, policy, dane)
        except ConnectFailed as e:
            proto.abort()
            if not (e.tls_failed and policy == "opportunistic"):
                raise
            # The handshake failed: remember it and try this host again in plaintext.
            self.no_tls_until[address] = self.clock.seconds() + NO_TLS_MEMORY
            log.info("STARTTLS with {mx} [{ip}] failed; plaintext for now", mx=hop.name, ip=address)
            proto = yield self._connect(address, hop.port, source)
            session = Session(proto, key, hop.name, helo=session.helo)
            try:
                yield self._open(session, policy)
            except ConnectFailed:
                proto.abort()
                raise
        # Pooled under what it actually is: a verified session carries the verified name.
        session.key = PoolKey(address, hop.port, source_name, policy, proto.tls_verified)
        return session

    @defer.inlineCallbacks
    def _connect(self, address: str, port: int, source: Any = None) -> Any:
        proto = SMTPClientProtocol(self.clock)
        kind = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
        local = source.address if source is not None else self.source_address
        bind = (local, 0) if local else None
        endpoint = kind(self.reactor, address, port, timeout=self.timeouts.connect, bindAddress=bind)
        attempt = endpoint.connect(cast("IProtocolFactory", _OneConnection(proto)))  # zope: no structural match
        self._connecting.add(attempt)
        try:
            yield attempt
        except error.ConnectBindError as e:
            if source is not None and self.selector is not None:
                self.selector.unusable(source, f"cannot bind {local}: {e}")
            raise ConnectFailed(Reply(451, "4.4.1", f"Cannot bind the source address {local}: {e}")) from None
        except Exception as e:
            raise ConnectFailed(Reply(451, "4.4.1", f"Connection to [{address}]:{port} failed: {e}")) from None
        finally:
            self._connecting.discard(attempt)
        self._live.add(proto)
        return proto

    @defer.inlineCallbacks
    def _open(self, session: Session, policy: str, dane: Any = None) -> Any:
        proto = session.proto
        t = self.timeouts
        try:
            greeting = yield proto.expect(t.greeting)
            if greeting.code != 220:
                raise SessionRefused(greeting, "greeting")
            yield proto.hello(session.helo, t)
        except SessionRefused as e:
            code = e.reply.code if e.reply.code >= 400 else 451
            raise ConnectFailed(Reply(code, e.reply.enhanced, f"{session.remote} refused {e.stage}: {e.reply.text}")) from None
        except Exception as e:
            raise ConnectFailed(Reply(451, "4.4.2", f"{session.remote}: {e or type(e).__name__}")) from None
        wants_tls = policy != "none" and self.tls_context_for is not None
        plaintext_ok = self.no_tls_until.get(session.key.address, 0) > self.clock.seconds()
        if wants_tls and proto.extensions.has("STARTTLS") and not (plaintext_ok and policy == "opportunistic"):
            verify = policy == "verify"  # DANE authenticates by the TLSA records instead of PKIX
            authenticated = verify or (policy == "dane" and dane is not None and bool(dane.records))
            context = cast("Callable[[str, bool], Any]", self.tls_context_for)(session.host, verify)  # wants_tls: set
            if policy == "dane" and hasattr(context, "getContext"):
                from pymta.outbound.dane import WithSNI

                context = WithSNI(context, session.host)
            try:
                yield proto.starttls(context, session.helo, t, verified_for=session.host if authenticated else None)
            except Exception as e:
                raise ConnectFailed(Reply(451, "4.7.5", f"STARTTLS with {session.remote} failed: {e}"), tls_failed=True,
                                    result_type="validation-failure") from None  # fmt: skip
            if policy == "dane" and dane is not None:
                from pymta.outbound.dane import check_chain

                problem = check_chain(proto.transport, dane, (session.host,))
                if problem is not None:  # checked before any mail command: nothing was sent
                    log.warn("DANE: {mx} failed TLSA authentication: {why}", mx=session.remote, why=problem,
                             result_type=problem.split(":")[0], event="dane_mismatch")  # fmt: skip
                    raise ConnectFailed(Reply(451, "4.7.5", f"{session.remote}: {problem}"),
                                        result_type=problem.split(":")[0])  # fmt: skip
        elif policy in ("verify", "dane"):
            raise ConnectFailed(Reply(451, "4.7.4", f"{session.remote} does not offer STARTTLS (TLS required)"),
                                result_type="starttls-not-supported")  # fmt: skip

    def _shaping_feedback(self, key: str, results: list[DeliveryResult]) -> None:
        for r in results:
            if self.shaper.observe(key, r.code, r.enhanced, r.text):
                break
        if any(r.code == 421 or (r.code == 451 and r.enhanced == "4.4.2") for r in results):
            self.shaper.congestion(key, f"{results[0].code} {results[0].enhanced}")
        elif any(200 <= r.code < 300 for r in results):
            self.shaper.success(key)

    def _release(self, session: Session, per_connection: int | None = None) -> None:
        proto = session.proto
        if proto.is_lost:
            return
        if self._stopping:
            proto.abort()
            return
        if session.messages >= (per_connection or self.max_messages_per_connection):
            self._quit(proto)
            return
        pool = self.idle.setdefault(session.key, [])
        if len(pool) >= (session.idle_cap or self.shaper.default.connections or UNCAPPED):
            self._quit(proto)
            return

        def expire() -> None:
            if session in pool:
                pool.remove(session)
            if not pool:
                self.idle.pop(session.key, None)
            self._quit(proto)

        session.idle_call = self.clock.callLater(self.idle_timeout, expire)
        pool.append(session)

    def _quit(self, proto: SMTPClientProtocol) -> None:
        d = quit_session(proto, self.timeouts)
        self._closing.append(d)
        d.addBoth(lambda _: self._closing.remove(d) if d in self._closing else None)

    def close_idle(self) -> defer.Deferred[Any]:
        """QUIT every idle connection (at shutdown); fires when they are closed."""
        closing = []
        for pool in list(self.idle.values()):
            for session in pool:
                if session.idle_call is not None and session.idle_call.active():
                    session.idle_call.cancel()
                closing.append(quit_session(session.proto, self.timeouts))
        self.idle.clear()
        closing.extend(self._closing)
        return defer.DeferredList(closing, consumeErrors=True)

    # -- transactions -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _send(self, session: Session, envelope: Envelope, recipients: list[Recipient], body: bytes,
              per_connection: int | None = None, per_message: int | None = None) -> Any:  # fmt: skip
        """Per-recipient results, or None when the session broke before any transaction started."""
        proto = session.proto
        ext = proto.extensions
        remote, tls = session.remote, proto.tls
        refused = self._unsendable(envelope, recipients, body, ext)
        if refused is not None:
            self._release(session, per_connection)
            return [_result(r, refused, remote, tls) for r in recipients]
        payload = encode_data(body)
        results: list[DeliveryResult] = []
        step = min(self.max_recipients, per_message or self.max_recipients)
        for start in range(0, len(recipients), step):
            batch = recipients[start : start + step]
            try:
                outcome = yield transact(proto, self._mail_line(envelope, body, ext),
                                         [self._rcpt_line(r, ext) for r in batch], payload, self.timeouts)  # fmt: skip
            except Exception as e:
                log.info("transaction with {mx} broken: {why!r}", mx=remote, why=e, qid=envelope.qid)
                proto.abort()
                if not results:
                    return None  # nothing happened yet: the caller tries the next address
                reply = Reply(451, "4.4.2", f"Connection with {remote} broken: {e}")
                results.extend(_result(r, reply, remote, tls) for r in recipients[start:])
                return results
            session.messages += 1
            results.extend(self._results(batch, outcome, ext, remote, tls))
            if proto.is_lost:
                rest = recipients[start + len(batch) :]
                reply = Reply(451, "4.4.2", f"Connection with {remote} lost")
                results.extend(_result(r, reply, remote, tls) for r in rest)
                return results
        self._release(session, per_connection)
        return results

    def _unsendable(self, envelope: Envelope, recipients: list[Recipient], body: bytes, ext: Any) -> Reply | None:
        needs_utf8 = envelope.smtputf8 or not envelope.sender.isascii() or any(not r.address.isascii() for r in recipients)
        if needs_utf8 and not ext.has("SMTPUTF8"):
            return Reply(550, "5.6.7", "The next hop does not support SMTPUTF8, which this message needs")
        if not body.isascii() and not ext.has("8BITMIME"):
            return Reply(554, "5.6.3", "The next hop does not accept 8-bit data (no 8BITMIME)")
        limit = ext.size_limit
        if limit is not None and len(body) > limit:
            return Reply(552, "5.3.4", f"Message size {len(body)} exceeds the next hop's limit of {limit}")
        return None

    @staticmethod
    def _mail_line(envelope: Envelope, body: bytes, ext: Any) -> str:
        return mail_command(envelope.sender, body, ext, envelope.smtputf8, envelope.ret, envelope.envid,
                            requiretls=requiretls_of(envelope))  # fmt: skip

    @staticmethod
    def _rcpt_line(rcpt: Recipient, ext: Any) -> str:
        params = []
        if ext.has("DSN"):
            if rcpt.notify:
                params.append("NOTIFY=" + ",".join(rcpt.notify))
            if rcpt.orcpt:
                addr_type, _, address = rcpt.orcpt.partition(";")
                params.append(f"ORCPT={addr_type};{xtext_encode(address)}")
        return " ".join([f"RCPT TO:<{rcpt.address}>", *params])

    @staticmethod
    def _results(batch: list[Recipient], outcome: Any, ext: Any, remote: str, tls: str | None) -> list[DeliveryResult]:
        out = []
        for i, rcpt in enumerate(batch):
            if outcome.mail.code != 250:
                out.append(_result(rcpt, outcome.mail, remote, tls))
                continue
            reply = outcome.rcpt[i] if i < len(outcome.rcpt) else Reply(451, "4.4.2", "No reply to RCPT")
            if reply.code not in (250, 251):
                out.append(_result(rcpt, reply, remote, tls))
            elif outcome.lost_after_data:
                lost = Reply(451, "4.4.2", f"Connection with {remote} lost after the end of data; may be a duplicate")
                out.append(_result(rcpt, lost, remote, tls))
            elif outcome.data is None:
                out.append(_result(rcpt, Reply(451, "4.4.2", "Transaction not completed"), remote, tls))
            else:
                result = _result(rcpt, outcome.data, remote, tls)
                if result.status == DELIVERED and rcpt.notify and "SUCCESS" in rcpt.notify and not ext.has("DSN"):
                    result = DeliveryResult(result.address, RELAYED, result.code, result.enhanced, result.text,
                                            remote, tls, result.extra)  # fmt: skip
                out.append(result)
        return out
