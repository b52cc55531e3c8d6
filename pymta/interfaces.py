"""The zope.interface boundaries between pymta's rooms, each with a real and a fake implementation.

Every fake passes the same contract tests as the real implementation (``tests/contract_*``).
Methods documented as returning a ``Deferred`` may return an already-fired one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    import builtins

    from twisted.internet.defer import Deferred

    from pymta.envelope import DeliveryResult, Envelope, Recipient

# Queue states (directories under state_dir/queue/ for the maildir store).
INCOMING = "incoming"  # just accepted, not yet looked at by the manager
ACTIVE = "active"  # taken by the manager, being delivered
DEFERRED = "deferred"  # waiting for its next attempt
HOLD = "hold"  # held by the operator: never scheduled until released
CORRUPT = "corrupt"  # unreadable envelope: quarantined, never scheduled
QUEUE_STATES = (INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT)


class QueueFull(Exception):
    """The store could not take a message for lack of space (ENOSPC/EDQUOT): answer 452 4.3.1."""


class QueueError(Exception):
    """The store failed for another local reason: answer 451 4.3.0."""


class IQueueStore(Interface):
    """Durable storage of envelopes and bodies, and their moves between queue states.

    Knows *what* is queued, never *when* (that is :class:`IScheduler`) nor anything of SMTP.
    """

    def enqueue(envelope: Envelope, body: bytes, state: str = INCOMING) -> Deferred[str]:
        """Store a new message (``envelope``: :class:`pymta.envelope.Envelope` whose ``qid`` is set;
        ``body``: bytes) in state INCOMING (or HOLD: quarantined by a content scanner, durable there
        from the start so that it is never picked up for delivery).

        Returns a Deferred that fires with the qid only once body and envelope are fsynced,
        renamed into the queue and the directories fsynced; it fails with :class:`QueueFull`
        or :class:`QueueError`, leaving no partial file behind.
        """

    def enqueue_many(envelopes_and_bodies: builtins.list[tuple[Envelope, bytes]], state: str = INCOMING) -> Deferred[builtins.list[Any]]:
        """:meth:`enqueue` for many new messages at once (one hop to the writing thread, one
        directory fsync for all). Fires with a list in the same order: the qid of each message
        that is durable in the queue, or the exception (QueueFull, QueueError, ValueError) that
        kept that one out, leaving nothing of it behind. A bad ``state`` fails the whole call."""

    def load(qid: str) -> Envelope:
        """Return the :class:`Envelope` of ``qid`` (synchronous: envelopes are small).

        Raises KeyError if there is no such message, ValueError if its envelope is unreadable.
        """

    def read_body(qid: str) -> bytes:
        """Return the body bytes of ``qid`` (synchronous). Raises KeyError if missing."""

    def load_message(qid: str) -> tuple[Envelope, bytes]:
        """``(load(qid), read_body(qid))`` with one read where the store can (a delivery attempt
        needs both); raises as they do."""

    def state(qid: str) -> str | None:
        """The queue state of ``qid`` (one of QUEUE_STATES), or None if it is not queued."""

    def update(envelope: Envelope) -> Deferred[Any]:
        """Durably rewrite the envelope of ``envelope.qid`` in its current state (the body is
        never rewritten). Returns a Deferred firing when it is on disk."""

    def move(qid: str, state: str) -> Deferred[Any]:
        """Durably move ``qid`` to ``state``. Returns a Deferred firing when done.

        A move into ACTIVE (an attempt starts) need not be durable: recovery puts ACTIVE back
        into INCOMING, so a crash that loses it changes nothing."""

    def remove(qid: str, durable: bool = True) -> Deferred[Any]:
        """Remove ``qid`` (envelope and body) from the queue. Returns a Deferred firing once the
        removal is on disk; with ``durable=False`` (every recipient's outcome is already recorded
        elsewhere, as for a message delivered to all) it may fire before, so a crash right after
        can bring the message back: delivered twice, never lost."""

    def list(state: str) -> builtins.list[str]:
        """The qids in ``state``, oldest first (a list; synchronous)."""

    def recover() -> dict[str, int]:
        """At start: delete leftovers in tmp/, move ACTIVE back to INCOMING, quarantine
        unreadable envelopes and drop bodies with no envelope. Returns a dict of counts."""

    def recover_incrementally(
        on_batch: Callable[[builtins.list[tuple[str, str, float, float]]], object],
    ) -> Deferred[dict[str, int]]:
        """What ``recover`` does, without holding the caller up while the queue is read: the
        sound messages go to ``on_batch(list of (qid, state, due, arrival))`` in batches as they
        are read (``due``: wall time of the next attempt; ``arrival``: wall time). Returns a
        Deferred that fires with the counts after the last batch. A store may hand out deferred
        messages unread (by name and time) and check each when it is loaded."""


class IScheduler(Interface):
    """When keys (qids, destinations) are due. Timer heap on an injected IReactorTime.

    The scheduler calls its ``on_due(key)`` callable when a key's time has come; it never
    touches the store. Its owner (the queue manager) sets ``on_due`` before scheduling anything.
    """

    on_due = Attribute("callable(key) called for each key whose time has come")

    def schedule(key: Hashable, when: float) -> None:
        """Make ``key`` due at absolute time ``when`` (replacing any earlier schedule of it)."""

    def cancel(key: Hashable) -> None:
        """Forget ``key``; no-op if unknown."""

    def when(key: Hashable) -> float | None:
        """The time ``key`` is due, or None."""

    def __len__() -> int:
        """How many keys are scheduled."""

    def __contains__(key: Hashable) -> bool:
        """Whether ``key`` is scheduled."""

    def due_now() -> None:
        """Make every scheduled key due at once (an operator's flush)."""

    def stop() -> None:
        """Disarm the timer; keys stay scheduled but nothing fires until the next ``schedule``."""


class IDeliveryAgent(Interface):
    """Delivers one message to a batch of its recipients and reports per recipient."""

    def deliver(envelope: Envelope, recipients: list[Recipient], body: bytes) -> Deferred[list[DeliveryResult]]:
        """Deliver ``body`` for ``envelope`` to ``recipients`` (a list of
        :class:`pymta.envelope.Recipient`, all of one route/destination).

        Returns a Deferred firing with a list of :class:`pymta.envelope.DeliveryResult`, one per
        recipient in the same order. It never errbacks for a remote problem: that is a
        DEFERRED or FAILED result.
        """


class ISMTPServerDelegate(Interface):
    """What the SMTP server (``pymta.smtp.server``) asks at each stage.

    Each method returns a :class:`pymta.smtp.replies.Reply`, ``None`` for the default
    positive reply, or a Deferred of either. The server never reads the next pipelined
    command before a Deferred returned here has fired.
    """

    def connected(session: Any) -> Any:
        """A client connected; a non-None negative reply refuses it (then the server closes)."""

    def helo(session: Any, name: str) -> Any:
        """HELO/EHLO ``name`` (already syntax-checked)."""

    def mail_from(session: Any, sender: str, params: dict[str, Any]) -> Any:
        """MAIL FROM ``sender`` ("" for <>) with ``params`` (dict of upper-case keyword -> value)."""

    def rcpt_to(session: Any, address: str, params: dict[str, Any]) -> Any:
        """RCPT TO ``address`` with ``params``; the transaction is ``session.transaction``.
        ``address`` is the bare ``"postmaster"`` for ``<postmaster>`` without a domain (RFC 5321 §4.5.1)."""

    def message(session: Any, body: bytes) -> Any:
        """End of data: ``body`` (bytes, CRLF lines, dot-unstuffed) for ``session.transaction``.

        The reply is the final answer for the transaction: 250 only once the message is durable.
        """

    def disconnected(session: Any) -> object:
        """The connection is gone (any reason). Return value ignored."""


class IPolicy(Interface):
    """Accept / reject decisions per SMTP stage (connect, helo, mail, rcpt, data)."""

    def check(stage: str, session: Any, **details: Any) -> Any:
        """Return a :class:`Reply` to refuse or answer, or None to go on (or a Deferred of either)."""


class IRecipientPolicy(Interface):
    """Who may relay and where each recipient goes: local mailbox, relay, forward, feedback
    (aliases, virtual maps, quotas and SRS behind it). Synchronous."""

    def may_relay(peer_address: str, auth_user: str | None = None) -> bool:
        """True for clients allowed to relay (authenticated, or in a trusted network)."""

    def recipient(address: str, peer_address: str, auth_user: str | None = None) -> Any:
        """The :class:`pymta.inbound.policy.Decision` for one RCPT TO address."""

    def over_quota(address: str, size: int = 0) -> bool:
        """True if the local mailbox of ``address`` is known to be full for ``size`` more octets."""

    def queue_recipients(
        targets: Any, address: str, orcpt: Any, notify: Any, sender: str, now: float, seen: Any = None
    ) -> list[Recipient]:
        """The queue's :class:`pymta.envelope.Recipient` list for ``address`` expanded into ``targets``."""

    def forward_sender(sender: str, now: float) -> str:
        """The envelope sender for forwarded targets (SRS-rewritten when configured)."""


class IResolver(Interface):
    """DNS records, never blocking the reactor (pymta.dns)."""

    def lookup_mx(domain: str) -> Deferred[Any]:
        """Deferred firing with the MX hosts of ``domain`` (see pymta.dns for the result type)."""

    def lookup_addresses(host: str) -> Deferred[list[str]]:
        """Deferred firing with the list of IPv6 and IPv4 addresses of ``host``."""

    def lookup_txt(name: str) -> Deferred[list[str]]:
        """Deferred firing with the TXT strings of ``name``."""

    def lookup_ptr(address: str) -> Deferred[list[str]]:
        """Deferred firing with the host names (PTR) of the IP ``address``, lower-case."""

    def lookup_tlsa(host: str, port: int = 25) -> Deferred[Any]:
        """Deferred firing with the :class:`pymta.dns.TLSAResult` of ``_PORT._tcp.HOST``."""

    def addresses_secure(host: str) -> Deferred[bool]:
        """Deferred firing with whether the address records of ``host`` are DNSSEC-validated."""


class ISuppressionList(Interface):
    """Is this address suppressed, and why."""

    def is_suppressed(address: str, sender_domain: str | None = None) -> dict[str, Any] | None:
        """Return the suppression record (dict) or None."""

    def add(address: str, reason: str, source: str, scope: str | None = None, expires: float | None = None) -> Any:
        """Suppress ``address``."""

    def remove(address: str, scope: str | None = None) -> bool:
        """Lift a suppression; True if there was one."""

    def record_bounce(address: str, reason: str, hard: bool, scope: str | None = None) -> dict[str, Any] | None:
        """Apply the suppression policy to one bounce (hard: at once; soft: past a threshold);
        the suppression record if one now applies, else None."""

    def record_complaint(address: str, reason: str = "complaint", scope: str | None = None) -> dict[str, Any]:
        """Suppress ``address`` for a complaint; the new record."""

    def count() -> int:
        """How many suppressions are stored."""


class ISuspensions(Interface):
    """Operator suspensions (domain, provider, source, campaign, tenant) kept until they lapse."""

    def add(kind: str, value: str, duration: float, reason: str) -> dict[str, Any]:
        """Suspend ``kind`` ``value`` for ``duration`` seconds; the new record (dict with ``id``)."""

    def remove(suspension_id: Any) -> dict[str, Any] | None:
        """Lift one suspension; its record, or None when there is none by that id."""

    def in_force() -> list[dict[str, Any]]:
        """The suspensions in force, soonest to lapse first."""

    def match(**names: Any) -> dict[str, Any] | None:
        """The suspension in force that holds mail with these names (domain=..., ...), or None."""


class ISession(Interface):
    """What the SMTP server knows of a connection (read by delegates and policy)."""

    peer_address = Attribute("client IP address as a string")
    peer_port = Attribute("client port")
    helo_name = Attribute("the HELO/EHLO argument, or None")
    esmtp = Attribute("True after EHLO")
    tls = Attribute("None, or a description of the TLS session")
    auth_user = Attribute("authenticated user, or None")
    transaction = Attribute("the current Transaction, or None")


class IInboundState(Interface):
    """Inbound counters that every listener process of a node (later: of a cluster) shares:
    connections per client, GCRA rates per client, greylisting triples.

    Keys are opaque strings chosen by the caller. Times come from the backend's injected clock.
    A backend that cannot answer (store down, lock timeout) fails open and logs: a limit
    store never refuses mail by itself. A backend across the network (the cluster's) answers
    each method with a Deferred of the value documented here.
    """

    owner = Attribute("the process (pid) whose connections this handle counts")

    def acquire_connection(key: str, limit: int) -> Any:
        """Count one more open connection for ``key`` unless ``limit`` are open; True if counted."""

    def release_connection(key: str) -> Any:
        """One connection counted by :meth:`acquire_connection` for ``key`` has ended."""

    def take(name: str, key: str, rate: Any) -> Any:
        """GCRA for limit ``name``: 0.0 if one event for ``key`` at ``rate`` may happen now (and
        is recorded), else the seconds until it would be allowed."""

    def greylist(triple: Any, delay: float, expire: float, lifetime: float) -> Any:
        """0.0 if the (client, sender, recipient) ``triple`` passes now (its pass is renewed for
        ``lifetime``), else the seconds until a retry would pass. A triple first seen more than
        ``expire`` ago without a passing retry starts again."""

    def release_owner(owner: Any) -> Any:
        """Forget the connections counted by process ``owner`` (it has ended)."""

    def clear_connections() -> Any:
        """Forget every counted connection (the node starts: no connection is open)."""

    def close() -> Any:
        """Release the store."""


class IClusterState(Interface):
    """State the nodes of a cluster share (``local``: this node alone; ``redis``): GCRA rates,
    connection leases, greylisting triples. Every operation returns a Deferred that fires within
    the backend's timeout; a backend that cannot reach its store answers from this node's own
    state with each limit divided by the nodes last seen alive, and never fails the caller.

    A name or key starting ``local:`` is kept per node even on a shared backend.
    """

    node = Attribute("this node's name, unique in the cluster")
    shared = Attribute("True while answers come from the shared store")

    def take(name: str, key: str, rate: Any) -> Deferred[float]:
        """GCRA: Deferred of 0.0 if one event for ``key`` at ``rate`` may happen now (recorded),
        else of the seconds until it would be allowed."""

    def acquire_lease(key: str, limit: int, lease: str, ttl: float, group: str | None = None) -> Deferred[bool]:
        """Deferred of True if ``lease`` (unique on this node) now holds one of ``limit`` slots of
        ``key``; the slot lapses after ``ttl`` seconds unless refreshed. With ``group`` the lease
        (named ``group + "." + ...``) belongs to that group of this node."""

    def release_group(group: str) -> Any:
        """Give back every lease of ``group`` on this node (``"*"``: of every group)."""

    def refresh_leases(leases: Any, ttl: float) -> Any:
        """Push the expiry of the (key, lease) pairs ``ttl`` seconds ahead (their connections live)."""

    def release_lease(key: str, lease: str) -> Any:
        """Give the slot back."""

    def greylist(triple: Any, delay: float, expire: float, lifetime: float) -> Deferred[float]:
        """As :meth:`IInboundState.greylist`, cluster-wide; a Deferred of the wait."""

    def nodes_alive() -> int:
        """Nodes seen alive at the last heartbeat (1 for a node alone)."""

    def take_quota(counters: Any) -> Deferred[bool]:
        """Daily quotas (warm-up caps): a Deferred of True when each (counter, cap) of ``counters``
        has room for one more (cap < 0: counted, no cap), which is then counted; else False. Away
        from the shared store a node may use the remaining quota it last saw, divided by the nodes
        last seen alive."""

    def give_back_quota(counters: Any) -> Any:
        """One counted by :meth:`take_quota` on these counters was not used."""

    def watch(table: str, on_records: Callable[[dict[str, Any]], object]) -> None:
        """Call ``on_records({name: record})`` with the records of ``table`` in force whenever this
        node reads them from the shared store (on joining, on every heartbeat, and at once when
        another node changes the table, where the backend publishes changes); one watcher
        per table, a later call replaces the earlier one."""

    def put_record(table: str, name: str, record: dict[str, Any], until: float) -> Deferred[bool]:
        """Keep the dict ``record`` under ``name`` in ``table`` for every node until ``until``;
        a Deferred of True once stored, False when the shared store cannot be reached."""

    def delete_record(table: str, name: str) -> Deferred[bool]:
        """Forget ``name`` in ``table``; a Deferred of True once done."""

    def start() -> Any:
        """Connect and begin the heartbeat; never fails."""

    def stop() -> Any:
        """Leave the cluster (the node's heartbeat is removed) and close."""
