"""The SMTP server's delegate: asks policy at each stage, turns an accepted transaction into a
durable queue entry, and answers 250 only once the store says the message is on disk."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from datetime import datetime
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pymta.dates import header_date
from pymta.envelope import ROUTE_LOCAL, ROUTE_RELAY, Envelope, Recipient, new_qid
from pymta.inbound.limits import ClientLimits, Greylist, then
from pymta.inbound.policy import Target
from pymta.inbound.scan import DISCARD, QUARANTINE, REJECT, TEMPFAIL, ScanRequest, Verdict, apply_edits
from pymta.inbound.submit import leave_records_to_pickup, record_queued
from pymta.interfaces import (
    HOLD,
    INCOMING,
    IPolicy,
    IQueueStore,
    IRecipientPolicy,
    ISMTPServerDelegate,
    QueueFull,
)
from pymta.smtp.replies import LOCAL_ERROR, STORAGE_FULL, Reply

log = Logger(namespace="pymta.inbound")


def received_header(session: Any, qid: str, hostname: str, recipients: list[str], now: float) -> bytes:
    """The ``Received:`` trace header (RFC 5321 §4.4) for one accepted transaction."""
    helo = session.helo_name or "unknown"
    peer = session.peer_address or "unknown"
    client_name = session.notes.get("client_name") or ""
    source = f"{client_name} [{peer}]" if client_name and client_name != "unknown" else f"[{peer}]"
    if session.notes.get("submitter"):
        source = "local"  # pymta-sendmail over the UNIX socket: no network peer
    extra = []
    if session.tls:
        extra.append(f"({session.tls})")
    if session.auth_user:
        extra.append(f"(authenticated as {session.auth_user})")
    submitter = session.notes.get("submitter")
    if submitter:
        extra.append(f"(local submission by uid {submitter['uid']} {submitter['user']})")
    lines = [f"Received: from {_header_safe(helo)} ({source})"]
    lines.append(f"\tby {hostname} (pymta) with {session.protocol_name} id {qid}")
    if extra:
        lines.append("\t" + " ".join(_header_safe(e) for e in extra))
    stamp = header_date(now)
    if len(recipients) == 1:
        lines.append(f"\tfor <{_header_safe(recipients[0])}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def take_deliver_after(body: bytes) -> tuple[bytes, float]:
    """Remove ``X-Pymta-Deliver-After`` from the header; its time (RFC 5322 date or ISO 8601) or 0."""
    body, value = take_header(body, b"X-Pymta-Deliver-After")
    if value is None:
        return body, 0.0
    when = 0.0
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        try:
            when = datetime.fromisoformat(value).timestamp()
        except ValueError:
            log.info("ignoring an unreadable X-Pymta-Deliver-After: {value}", value=value[:80])
    return body, when


def take_header(body: bytes, name: bytes) -> tuple[bytes, str | None]:
    """Remove header ``name`` from the message header; its (unfolded) value or None."""
    m = next(_header_fields(body, name), None)
    if m is None:
        return body, None
    return body[: m.start()] + body[m.end() :], _unfolded(m)


def header_values(body: bytes, name: bytes) -> list[str]:
    """The (unfolded) values of every header field ``name`` in the message header."""
    return [_unfolded(m) for m in _header_fields(body, name)]


MAX_HOPS = 50


def hop_count(body: bytes) -> int:
    """How many ``Received:`` fields the message header has (counting stops past MAX_HOPS)."""
    return sum(1 for _ in itertools.islice(_header_fields(body, b"Received"), MAX_HOPS + 1))


def _header_fields(body: bytes, name: bytes) -> Any:
    end = body.find(b"\r\n\r\n")
    head = body[: end + 2] if end >= 0 else body
    return re.finditer(rb"^" + re.escape(name) + rb":[ \t]*(.*(?:\r\n[ \t].*)*)\r\n", head, re.I | re.M)


def _unfolded(m: re.Match[bytes]) -> str:
    return " ".join(m.group(1).decode("utf-8", "replace").split())


def unowned_from(body: bytes, user: str, owns: Callable[[str, str], bool]) -> str | None:
    """The first From: header address ``user`` does not own (or the unreadable From: text), else None."""
    for value in header_values(body, b"From"):
        addresses = [address for _, address in getaddresses([value]) if address]
        if not addresses:
            return value[:200]
        for address in addresses:
            if not owns(user, address):
                return address
    return None


def _header_safe(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)


@implementer(ISMTPServerDelegate)
class InboundReceiver:
    """Stage decisions for the MX/relay listener and the hand-over to the queue.

    ``clock`` is a wall clock (the reactor): its time is written down as the message's arrival,
    in its queue id and in the date of its ``Received:`` field, one instant for all three."""

    def __init__(
        self,
        hostname: str,
        policy: IRecipientPolicy,
        store: IQueueStore,
        clock: IReactorTime,
        on_queued: Callable[[str], None] | None = None,
        accounting: Any = None,
        records_at_pickup: bool = False,
        acl: IPolicy | None = None,
        limits: ClientLimits | None = None,
        greylist: Greylist | None = None,
        suppression: Any = None,
        dnsbl: Any = None,
        resolver: Any = None,
        reverse_lookup: bool = False,
        sender_login: Any = None,
        free_space: Callable[[], int] | None = None,
        space_needed: int = 0,
        sender_auth: Any = None,
        max_expanded: int = 10000,
        scan: Any = None,
    ) -> None:
        self.hostname = hostname
        # The zope Interfaces below: mypy reads their methods without ``self``, so held as Any.
        self.policy: Any = policy
        self.store: Any = store
        self.clock: Any = clock
        self.on_queued = on_queued
        self.accounting = accounting
        self.records_at_pickup = records_at_pickup  # a queue manager delivers from this queue: see leave_records_to_pickup
        self.acl: Any = acl
        self.limits = limits
        self.greylist = greylist
        self.suppression = suppression
        self.dnsbl = dnsbl
        self.resolver = resolver
        self.reverse_lookup = reverse_lookup and resolver is not None
        self.sender_login = sender_login  # SenderLogins: authenticated users send only as themselves
        # Octets free where the queue lives (a callable, asked at MAIL) and how many must be, so
        # a full disk is refused before the client sends the body.
        self.free_space = free_space
        self.space_needed = space_needed
        self.sender_auth = sender_auth  # pymta.auth.accept.SenderAuth: DKIM signing, inbound verdicts
        self.max_expanded = max_expanded  # recipients one transaction may hold after alias expansion
        self.scan = scan  # ScanChain: rspamd / milters before the 250

    # -- stages ---------------------------------------------------------------------------

    def _acl(self, stage: str, session: Any, **details: Any) -> Reply | None:
        return self.acl.check(stage, session, **details) if self.acl is not None else None

    def _trusted(self, session: Any) -> bool:
        """Relay networks and authenticated clients are never rate-limited or greylisted."""
        trusted = session.notes.get("trusted")
        if trusted is None or session.auth_user:
            trusted = session.notes["trusted"] = self.policy.may_relay(session.peer_address, session.auth_user)
        return cast(bool, trusted)

    def connected(self, session: Any) -> Reply | defer.Deferred[Any] | None:
        if self.reverse_lookup:
            d = self._client_name(session)
            return d.addCallback(lambda _: self._connected(session))
        return self._connected(session)

    @defer.inlineCallbacks
    def _client_name(self, session: Any) -> Any:
        """Forward-confirmed reverse DNS of the client into ``session.notes["client_name"]``."""
        name = "unknown"
        try:
            for candidate in (yield self.resolver.lookup_ptr(session.peer_address))[:3]:
                addresses = yield self.resolver.lookup_addresses(candidate)
                if session.peer_address in addresses:
                    name = candidate
                    break
        except Exception:  # DNS failures: the client stays "unknown"
            pass
        session.notes["client_name"] = name

    def _connected(self, session: Any) -> Reply | defer.Deferred[Any] | None:
        trusted = self._trusted(session)
        if self.limits is not None and not trusted:

            def counted(refused: Reply | None) -> Reply | defer.Deferred[Any] | None:
                if refused is not None:
                    return refused
                if session.notes.get("gone"):  # the client left while the cluster answered
                    cast(ClientLimits, self.limits).disconnected(session.peer_address)  # checked above
                    return None
                session.notes["counted"] = True
                return self._connected_checks(session, trusted)

            return cast("Reply | defer.Deferred[Any] | None", then(self.limits.connected(session.peer_address), counted))
        return self._connected_checks(session, trusted)

    def _connected_checks(self, session: Any, trusted: bool) -> Reply | defer.Deferred[Any] | None:
        refused = self._acl("connect", session)
        if refused is not None or trusted or self.dnsbl is None or not self.dnsbl.zones:
            return refused
        return cast("Reply | defer.Deferred[Any] | None", self.dnsbl.check(session.peer_address))

    def helo(self, session: Any, name: str) -> Reply | None:
        return self._acl("helo", session)

    def mail_from(self, session: Any, sender: str, params: dict[str, str]) -> Reply | defer.Deferred[Any] | None:
        user = session.auth_user
        if user and self.sender_login is not None and sender and not self.sender_login.owns(user, sender):
            return Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {user}")
        if self.free_space is not None:
            free = self.free_space()
            if free <= self.space_needed:
                log.warn("refusing mail: {free} octets free for the queue, {needed} needed", event="storage_low",
                         free=free, needed=self.space_needed)  # fmt: skip
                return STORAGE_FULL
        size = params.get("SIZE")

        def acl(refused: Reply | None = None) -> Reply | None:
            if refused is not None:
                return refused
            return self._acl("mail", session, sender=sender, size=int(size) if size and size.isdigit() else None)

        if self.limits is not None and not self._trusted(session):
            return cast("Reply | defer.Deferred[Any] | None", then(self.limits.message(session.peer_address), acl))
        return acl()

    def rcpt_to(self, session: Any, address: str, params: dict[str, str]) -> Reply | defer.Deferred[Any] | None:
        refused: Reply | defer.Deferred[Any] | None = self._acl("rcpt", session, recipient=address)
        if refused is not None:
            return refused
        decision = self.policy.recipient(address, session.peer_address, session.auth_user)
        if decision.reply is not None:
            return cast(Reply, decision.reply)  # the SMTP server logs the one reject event, with the recipient
        targets = decision.deliveries()
        deliverable = [t for t in targets if t.route is not None]
        size = session.transaction.declared_size or 0
        if deliverable and all(t.route == ROUTE_LOCAL and self.policy.over_quota(t.address, size) for t in deliverable):
            return Reply(452, "4.2.2", "Mailbox full: quota exceeded")
        if not self._trusted(session):
            refused = self._untrusted_rcpt(session, decision.address)
            if isinstance(refused, defer.Deferred):  # the cluster's limits and greylisting answer later
                return refused.addCallback(
                    lambda r: r if r is not None else self._rcpt_accepted(session, address, decision, targets))
            if refused is not None:
                return refused
        elif decision.route == ROUTE_RELAY and self.suppression is not None:
            sender = session.transaction.sender
            entry = self.suppression.is_suppressed(decision.address, sender.rpartition("@")[2] or None)
            if entry is not None:
                return Reply(550, "5.7.1", f"Recipient suppressed ({entry['source']}: {entry['reason']})")
        return self._rcpt_accepted(session, address, decision, targets)

    def _rcpt_accepted(self, session: Any, address: str, decision: Any, targets: list[Any]) -> Reply | None:
        notes = session.transaction.notes
        expanded = notes.get("expanded", 0) + len(targets)
        if decision.targets and expanded > self.max_expanded:
            return Reply(452, "4.5.3", "Too many recipients after alias expansion")
        notes["expanded"] = expanded
        notes.setdefault("routes", {})[address] = targets if decision.targets else (decision.route, decision.address)
        return None

    def _untrusted_rcpt(self, session: Any, address: str) -> Reply | defer.Deferred[Any] | None:
        def greylist(refused: Reply | None = None) -> Reply | defer.Deferred[Any] | None:
            if refused is not None or self.greylist is None:
                return refused
            return self.greylist.check(session.peer_address, session.transaction.sender, address)

        if self.limits is not None:
            return cast("Reply | defer.Deferred[Any] | None", then(self.limits.recipient(session.peer_address), greylist))
        return greylist()

    def message(self, session: Any, body: bytes) -> defer.Deferred[Reply] | Reply:
        # Inbound verdicts (untrusted clients) come first, so scanners see Authentication-Results;
        # DKIM signing (trusted clients) comes last, in _enqueue, after our own header changes and
        # the scanners' edits, so neither can break the signature.
        if self.sender_auth is not None and not self._trusted(session):
            d = self.sender_auth.accept(session, body, False)
            return cast("defer.Deferred[Reply]", d.addCallback(lambda got: got if isinstance(got, Reply) else self._message(session, got)))
        return self._message(session, body)

    def _message(self, session: Any, body: bytes) -> defer.Deferred[Reply] | Reply:
        txn = session.transaction
        if hop_count(body) > MAX_HOPS:  # forwarding between hosts that loops (Postfix's hopcount_limit)
            return Reply(554, "5.4.6", "Too many hops: mail loop")
        refused = self._acl(
            "data", session, sender=txn.sender, recipients=[r.address for r in txn.recipients], size=len(body)
        )
        if refused is not None:
            return refused
        user = session.auth_user
        if user and self.sender_login is not None:
            unowned = unowned_from(body, user, self.sender_login.owns)
            if unowned is not None:
                return Reply(553, "5.7.1", f"From: <{_header_safe(unowned)}> rejected: not owned by user {user}")
        now = self.clock.seconds()
        qid = new_qid(now)
        routes = txn.notes.get("routes", {})
        recipients: list[Recipient] = []
        seen: set[str] = set()
        for accepted in txn.recipients:
            entry = routes.get(accepted.address, (None, accepted.address))
            if isinstance(entry[0], Target):  # expanded through aliases and virtual maps
                recipients.extend(self.policy.queue_recipients(entry, accepted.address, accepted.orcpt, accepted.notify,
                                                               txn.sender, now, seen))  # fmt: skip
                continue
            route, address = entry
            if route is None or address.lower() in seen:
                continue
            seen.add(address.lower())
            recipients.append(Recipient(address=address, route=route, orcpt=accepted.orcpt, notify=accepted.notify))
        not_before = 0.0
        pool = None
        if self._trusted(session):
            body, not_before = take_deliver_after(body)
            body, pool = take_header(body, b"X-Pymta-Pool")
        header = received_header(session, qid, self.hostname, [r.address for r in recipients], now)
        data = header + body
        envelope = Envelope(
            qid=qid,
            sender=txn.sender,
            recipients=recipients,
            arrival=now,
            size=len(data),
            body_type=txn.body_type,
            smtputf8=txn.smtputf8,
            ret=txn.ret,
            envid=txn.envid,
            client_address=session.peer_address or "",
            client_name=session.notes.get("client_name") or "",
            helo=session.helo_name or "",
            protocol=session.protocol_name,
            auth_user=session.auth_user,
            tls=session.tls,
            not_before=not_before,
            extra={**({"pool": pool} if pool else {}), **({"requiretls": True} if "REQUIRETLS" in txn.params else {})},
        )
        if session.notes.get("submitter"):
            envelope.extra["submitter"] = session.notes["submitter"]["user"]
        if self.scan is not None:
            request = ScanRequest(
                qid, txn.sender, [r.address for r in recipients], data, self.hostname, envelope.client_address,
                envelope.client_name, envelope.helo, envelope.auth_user, envelope.tls,
            )  # fmt: skip
            d: defer.Deferred[Reply] = self.scan.scan(request)
            d.addCallbacks(self._scanned, self._scan_failed, callbackArgs=(session, envelope, data),
                           errbackArgs=(envelope,))  # fmt: skip
            return d
        return self._enqueue(session, envelope, data)

    def _enqueue(self, session: Any, envelope: Envelope, data: bytes, state: str = INCOMING) -> defer.Deferred[Any]:
        if self.sender_auth is not None and self._trusted(session):
            d = self.sender_auth.sign(data, session.auth_user, session.peer_address or "")
            return cast("defer.Deferred[Any]", d.addCallback(lambda signed: self._store(session, envelope, signed, state)))
        return self._store(session, envelope, data, state)

    def _store(self, session: Any, envelope: Envelope, data: bytes, state: str) -> defer.Deferred[Any]:
        envelope.size = len(data)
        if state == INCOMING:
            leave_records_to_pickup(envelope, self.accounting, self.records_at_pickup)
        args = (envelope, data) if state == INCOMING else (envelope, data, state)
        d = defer.maybeDeferred(self.store.enqueue, *args)
        d.addCallbacks(self._queued, self._not_queued, callbackArgs=(session, envelope), errbackArgs=(session, envelope))
        return d

    def _scanned(self, verdict: Verdict, session: Any, envelope: Envelope, data: bytes) -> Reply | defer.Deferred[Any]:
        """Apply a scan verdict: refuse, drop, or queue (with the header changes; quarantine into hold/)."""
        if verdict.action in (REJECT, TEMPFAIL) and verdict.reply is not None:
            log.info("message from <{sender}> refused by {scanner}: {reply}", event="scan_refused",
                     scanner=verdict.scanner, sender=envelope.sender, client=envelope.client_address,
                     reply=str(verdict.reply), code=verdict.reply.code, enhanced=verdict.reply.enhanced)  # fmt: skip
            return verdict.reply
        if verdict.action == DISCARD:
            log.info("message {qid} from <{sender}> discarded by {scanner}", event="scan_discarded", qid=envelope.qid,
                     scanner=verdict.scanner, sender=envelope.sender, client=envelope.client_address)  # fmt: skip
            return Reply(250, "2.0.0", f"Ok: discarded as {envelope.qid}")
        data = apply_edits(data, verdict.edits)
        envelope.size = len(data)
        if verdict.action == QUARANTINE:
            envelope.extra["quarantine"] = {"reason": verdict.quarantine, "scanner": verdict.scanner}
            log.info("message {qid} quarantined by {scanner}: {reason}", event="scan_quarantined", qid=envelope.qid,
                     scanner=verdict.scanner, reason=verdict.quarantine)  # fmt: skip
            return self._enqueue(session, envelope, data, HOLD)
        return self._enqueue(session, envelope, data)

    def _scan_failed(self, failure: Any, envelope: Envelope) -> Reply:
        log.failure("content scan of {qid} failed", failure, qid=envelope.qid, event="scan_error")
        return Reply(451, "4.7.1", "Content scanner unavailable, try again later")

    def disconnected(self, session: Any) -> None:
        session.notes["gone"] = True
        if self.limits is not None and session.notes.pop("counted", False):
            self.limits.disconnected(session.peer_address)

    # -- outcome --------------------------------------------------------------------------

    def _queued(self, _: Any, session: Any, envelope: Envelope) -> defer.Deferred[Any]:
        reply = Reply(250, "2.0.0", f"Ok: queued as {envelope.qid}")
        held = "quarantine" in envelope.extra  # in hold/: nothing for the queue manager until released
        # Where record_queued writes the received records (hold/, or nothing delivers from this
        # queue), the 250 waits until they are on disk too; else the queue manager writes them.
        d = record_queued(envelope, self.accounting, None if held else self.on_queued, code=reply.code,
                          enhanced=reply.enhanced)  # fmt: skip
        return d.addCallback(lambda _: reply)

    def _not_queued(self, failure: Any, session: Any, envelope: Envelope) -> Reply:
        reply = STORAGE_FULL if failure.check(QueueFull) else LOCAL_ERROR
        log.error(
            "could not queue message from <{sender}>: {why}",
            event="queue_failed",
            client=envelope.client_address,
            sender=envelope.sender,
            why=failure.getErrorMessage(),
            code=reply.code,
            enhanced=reply.enhanced,
        )
        return reply
