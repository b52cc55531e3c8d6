"""``twistd pymta``: command-line options and makeService, the one place that knows every room.

It reads the configuration, then wires the real reactor, clock, resolver and thread pool into
the store, the queue manager, the delivery agents and the SMTP listeners, as one MultiService.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from twisted.application import service, strports
from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from pymta.config import Config, ConfigError, default_config_path, load_config
from pymta.shutdown import CLOSE, SESSION_GRACE, SessionDrain, SignalGuard, StagedService, ThreadPoolService
from pymta.stores import queue_store, recipient_policy, suppression_store
from pymta.threads import FilePool

if TYPE_CHECKING:
    from collections.abc import Iterable

    from twisted.internet.interfaces import IProtocolFactory, IReactorTime

    from pymta.config import AclRule
    from pymta.interfaces import IPolicy, IScheduler


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the pymta mail transfer agent: the SMTP listeners (MX and relay), the durable queue "
        "and its manager, local Maildir delivery and outbound SMTP delivery."
    )
    optParameters = [  # noqa: RUF012 (twisted.python.usage.Options reads this class attribute)
        ["config", "c", None, "configuration file (default: $PYMTA_CONFIG, else /etc/pymta/pymta.toml)"],
        ["worker-fds", None, None, "(internal) run as a listener worker on these inherited sockets"],
    ]

    def postOptions(self) -> None:
        path = self["config"] or default_config_path()
        try:
            self["loaded"] = load_config(path)
        except ConfigError as e:
            # One line naming file, key and reason; no help text, no traceback.
            sys.stderr.write(f"pymta: configuration error: {e}\n")
            raise SystemExit(2) from None


class CloseOnStop(service.Service):
    """Calls ``close`` when the service tree stops, once the listeners, sessions and deliveries that
    used it are done (the ``CLOSE`` stage of :mod:`pymta.shutdown`)."""

    stop_stage = CLOSE

    def __init__(self, close: Any) -> None:
        self.close = close

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.close()


class StartupError(Exception):
    """The MTA cannot start; the text says what and where, in one line."""


def makeService(options: dict[str, Any]) -> service.MultiService:
    """Every startup failure is one line on standard error and exit status 2, never a traceback."""
    import sqlite3

    from pymta.admin.http.tokens import TokensFileError
    from pymta.auth.dkim import DkimKeyError
    from pymta.inbound.aliases import TableError
    from pymta.inbound.auth import UsersFileError
    from pymta.state.local import InboundStateError
    from pymta.tls import TLSConfigError

    config: Config = options["loaded"]
    worker_fds = None
    if options.get("worker-fds"):
        from pymta.workers import die_with_parent

        die_with_parent()
        # "FD:FAMILY" pairs, as the main process writes them
        worker_fds = cast(list[tuple[int, int]], [tuple(int(x) for x in item.split(":")) for item in options["worker-fds"].split(",")])
    try:
        if worker_fds is None:  # the workers share the main process's state_dir and sockets
            lock_state_dir(config.state_dir)
            check_listeners(config)
        top = build_service(config, global_reactor, worker_fds)
    except TLSConfigError as e:
        _startup_failed(f"configuration error: {config.path}: {e.key}: {e}" if e.key else f"configuration error: {e}")
    except UsersFileError as e:
        _startup_failed(f"configuration error: {config.path}: submission.users_file: {e}")
    except (TokensFileError, InboundStateError, DkimKeyError, TableError) as e:
        _startup_failed(f"configuration error: {e}")
    except StartupError as e:
        _startup_failed(str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _startup_failed(f"cannot start: {where}{e.strerror or e}")
    except sqlite3.Error as e:
        databases = [config.suppression_db, os.path.join(config.state_dir, "inbound.sqlite")]
        databases += [os.path.join(config.state_dir, "warmup.sqlite")] if config.pools else []
        databases += [os.path.join(config.state_dir, "suspensions.sqlite")]
        databases += [os.path.join(config.state_dir, "stats.sqlite")] if config.http.listen else []
        _startup_failed(f"cannot start: cannot open database {' or '.join(databases)}: {e}")
    SignalGuard(global_reactor).setServiceParent(top)
    return top


def _startup_failed(text: str) -> None:
    sys.stderr.write(f"pymta: {text}\n")
    raise SystemExit(2) from None


_held: list[int] = []  # descriptors of the locks this process holds (for its whole life)


def lock_state_dir(state_dir: str) -> None:
    """Take ``state_dir/pymta.lock`` (flock): two MTAs on one queue would deliver everything twice."""
    import fcntl

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "pymta.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"{state_dir}: in use by another running pymta (pid {holder}, lock {path})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held.append(fd)


def check_listeners(config: Config) -> None:
    """Fail early, in one line, on an address we cannot listen on (in use, not ours, privileged)."""
    import socket

    for key, endpoints in (("smtp.listen", config.smtp.listen), ("smtp.listen_tls", config.smtp.listen_tls),
                           ("submission.listen", config.submission.listen), ("http.listen", config.http.listen),
                           ("http.public_listen", config.http.public_listen)):  # fmt: skip
        for endpoint in endpoints:
            for interface, port in listener_addresses((endpoint,)):
                if port == 0:
                    continue
                family = socket.AF_INET6 if ":" in interface else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        sock.bind((interface, port))
                    except OSError as e:
                        raise StartupError(f"cannot listen on {endpoint} ({key}): {e.strerror}") from None


@dataclass
class Wiring:
    """The parts :func:`build_service`'s builders make and hand on, in the order they are built."""

    config: Config
    reactor: Any
    main: bool  # False in a listener worker: it only accepts into the queue
    accepting: int = 1  # processes that accept on the MX listeners (from the main process's configuration)
    # A queue manager delivers from this queue (the main process's, for a listener worker): the
    # received accounting records are its to write (pymta.inbound.submit.leave_records_to_pickup).
    records_at_pickup: bool = False
    top: Any = None  # the StagedService everything hangs from
    pool: Any = None  # queue and Maildir file I/O
    drain: Any = None  # the SMTP factories whose sessions a stop waits for
    session_grace: float = 0.0
    store: Any = None
    free_space: Any = None  # octets free for the queue (FreeSpace)
    accounting: Any = None
    reopen: Any = None  # reopens the log files (SIGUSR1, SIGHUP)
    journal: Any = None
    webhooks: Any = None
    quotas: Any = None
    agents: dict[str, Any] = field(default_factory=dict)
    resolver: Any = None
    sender_auth: Any = None
    shared: Any = None  # the cluster state, or None
    smtp_agent: Any = None
    suppression: Any = None
    tagger: Any = None
    manager: Any = None
    metrics: Any = None
    notify: Any = None  # tells the queue manager of a new message
    inbound_state: Any = None
    policy: Any = None
    receiver: Any = None
    limits: Any = None
    mx_slots: Any = None
    server_tls: Any = None
    factory: Any = None  # the MX listeners' SMTP factory

    @property
    def signer_sign(self) -> Any:
        """DKIM signing for mail we write ourselves, or None."""
        auth = self.sender_auth
        return auth.sign if auth is not None and auth.signer is not None else None


def build_service(config: Config, reactor: Any, worker_fds: list[tuple[int, int]] | None = None) -> service.MultiService:
    """The whole service tree for ``config`` on ``reactor`` (tests pass their own).

    ``worker_fds``: (file descriptor, address family) of inherited listening sockets — this
    process is then a listener worker that only accepts into the queue.
    """
    import attrs

    from pymta.log import set_debug

    set_debug(config.log.debug)
    accepting = accepting_processes(config)  # from the main process's configuration, not a worker's
    records_at_pickup = config.queue.deliver
    if worker_fds is not None:
        config = attrs.evolve(config, queue=attrs.evolve(config.queue, deliver=False))
    w = Wiring(config, reactor, main=worker_fds is None, accepting=accepting, records_at_pickup=records_at_pickup)
    _build_foundation(w)
    _build_delivery(w)
    _build_inbound(w)
    if worker_fds is not None:
        from pymta.workers import AdoptedPort

        for fd, family in worker_fds:
            AdoptedPort(reactor, fd, family, w.factory, inherited=True).setServiceParent(w.top)
        return cast(service.MultiService, w.top)
    _listen(config, reactor, w.factory, w.top, on_worker_ended=w.inbound_state.release_owner,
            stop_limit=w.session_grace + 2.5)  # fmt: skip
    if config.sendmail.socket:
        _local_submission(config.sendmail.socket, w.receiver, config.hostname, w.limits, reactor, w.drain, w.top)
    _build_admin(w)
    _build_tls_and_submission_listeners(w)
    return cast(service.MultiService, w.top)


def _build_foundation(w: Wiring) -> None:
    """Directories, the staged top service, thread pools, the queue store, accounting and events."""
    from pymta.admin.accounting import ACCOUNTING_WINDOW, AccountingLog

    config, reactor = w.config, w.reactor
    for path in (config.state_dir, config.queue_dir, config.mail_dir, config.log_dir):
        os.makedirs(path, mode=0o700, exist_ok=True)
    grace = config.queue.shutdown_grace
    w.session_grace = min(SESSION_GRACE, grace)
    top = w.top = StagedService(reactor, grace)
    # Three pools, so that one kind of slow work cannot hold up another: queue and Maildir file
    # I/O (the 250 waits for it), DNS lookups (a dead resolver blocks a thread for its timeout),
    # password hashing (scrypt, CPU-bound, deliberately slow).
    w.pool = FilePool(16, name="pymta-io")
    ThreadPoolService(w.pool).setServiceParent(top)
    dns_pool = ThreadPool(minthreads=1, maxthreads=16, name="pymta-dns")
    ThreadPoolService(dns_pool, join=False).setServiceParent(top)
    w.drain = SessionDrain([], reactor, w.session_grace)
    w.drain.setServiceParent(top)

    w.free_space = FreeSpace(config.queue_dir, reactor)
    w.store = queue_store(config, reactor, w.pool, space_low=spare_space_low(config, w.free_space))
    if config.log.accounting:
        # Its own thread: record fsyncs never wait behind (or delay) queue or DNS work.
        accounting_pool = FilePool(1, name="pymta-accounting")
        ThreadPoolService(accounting_pool).setServiceParent(top)
        w.accounting = AccountingLog(
            os.path.join(config.log_dir, "accounting.jsonl"), reactor,
            run=lambda f: deferToThreadPool(reactor, cast(Any, accounting_pool), f), fsync=config.queue.fsync,
            window=ACCOUNTING_WINDOW,
        )  # fmt: skip
        CloseOnStop(w.accounting.close).setServiceParent(top)
    w.reopen = _log_reopener(w.accounting)
    ReloadOnHangup(w.reopen, reactor, signal.SIGUSR1).setServiceParent(top)
    if w.main and (config.webhooks or config.tracking.enabled):
        w.journal, w.webhooks, w.accounting = _events(config, reactor, w.pool, top, w.accounting)
    from pymta.dns import Resolver

    w.resolver = Resolver(reactor, dns_pool, config.dns.servers, timeout=config.dns.timeout, dnssec=config.dns.dnssec)


def _build_delivery(w: Wiring) -> None:
    """The delivery agents (Maildir, SMTP behind the feedback gate, feedback processor) and the
    queue manager that drives them (started only where this process delivers)."""
    from pymta.auth.accept import sender_auth_from_config
    from pymta.feedback.classify import classify
    from pymta.feedback.gate import FeedbackGate
    from pymta.feedback.pool import ParsePool
    from pymta.feedback.processor import FeedbackProcessor
    from pymta.inbound.quota import Quotas
    from pymta.queue.manager import QueueManager, local_route_for
    from pymta.queue.scheduler import MonotonicClock, TimerHeapScheduler

    config, reactor, top = w.config, w.reactor, w.top
    w.quotas = Quotas(config.mailbox.quota, config.mailbox.quotas)
    agents = w.agents
    agents["local"] = _mailbox_agent(config, reactor, w.pool, top, w.quotas)
    sender_auth = w.sender_auth = sender_auth_from_config(config, reactor, w.resolver)
    if sender_auth is not None:
        ThreadPoolService(sender_auth.threadpool).setServiceParent(top)
        CloseOnStop(sender_auth.stop).setServiceParent(top)  # stops first: lookups in flight give up
    tls_reports = _tls_reporter(config, reactor, w.resolver, w.store, top)
    w.shared = _cluster_state(config, reactor, top)
    smtp_agent = w.smtp_agent = _outbound_agent(config, reactor, w.resolver, tls_reports, w.shared)
    CloseOnStop(smtp_agent.close_idle).setServiceParent(top)
    w.suppression, w.tagger = _feedback_parts(config, reactor, w.shared)
    CloseOnStop(w.suppression.close).setServiceParent(top)
    fb = config.feedback
    relay = FeedbackGate(smtp_agent, w.suppression, w.tagger, fb.sender_domains, classify, fb.unsubscribe,
                         config.http.public_url if config.http.public_listen else None,
                         signer=sender_auth.signer if sender_auth is not None else None)  # fmt: skip
    agents["relay"] = agents["forward"] = relay
    parse_pool = ParsePool(reactor)  # bounces are parsed in a worker process, never on the reactor
    CloseOnStop(parse_pool.close).setServiceParent(top)
    agents["feedback"] = FeedbackProcessor(
        w.suppression, w.tagger, fb.complaint_addresses, fb.reply_addresses, agents["local"], fb.reply_mailbox,
        w.accounting, sources=smtp_agent.selector, parser=parse_pool.parse, tls_reports=_tls_report_inbox(config, top),
        authserv_id=sender_auth.authserv_id if sender_auth is not None and sender_auth.verify else None,
        events=w.journal,
    )  # fmt: skip

    monotonic = MonotonicClock(reactor)  # retries and expiry immune to wall-clock steps
    manager = w.manager = QueueManager(
        store=w.store,
        agents=agents,
        clock=monotonic,
        scheduler=cast("IScheduler", TimerHeapScheduler(cast("IReactorTime", monotonic))),  # zope: no structural match
        wall=reactor,
        hostname=config.hostname,
        retry_initial=config.queue.retry_initial,
        retry_max=config.queue.retry_max,
        max_age=config.queue.max_age,
        delay_warning=config.queue.delay_warning,
        max_active=config.queue.max_active,
        accounting=w.accounting,
        route_for=local_route_for(config.domains.local),
        greylist_retry=config.queue.greylist_retry,
        shutdown_grace=config.queue.shutdown_grace,
        abort=lambda: (smtp_agent.abort_all(), getattr(agents["local"], "abort_all", lambda: None)()),
        sign=w.signer_sign,
    )
    if tls_reports is not None:
        tls_reports.notify = manager.notify_incoming
    from pymta.admin.http.service import make_metrics

    w.metrics = make_metrics(config) if w.main else None
    # Every message the queue manager hears of (from this process or a listener worker) is counted once.
    notify = w.metrics.counting(manager.notify_incoming) if w.metrics is not None else manager.notify_incoming
    if config.queue.deliver:
        from pymta.queue.watch import IncomingWatcher

        w.notify = notify
        # The watch starts before the manager's start-up scan of incoming/: mail that a listener
        # worker renames in between raises an event instead of waiting for the next restart.
        IncomingWatcher(os.path.join(config.queue_dir, "incoming"), notify, reactor).setServiceParent(top)
        manager.setServiceParent(top)
        if config.queue.spare_files:
            _spare_sweeper(w.store, reactor).setServiceParent(top)


SPARE_SWEEP_EVERY = 60.0
SPARE_MAX_AGE = 600.0  # a spare not reused for this long is unlinked (see MaildirQueueStore.sweep_spares)


def _spare_sweeper(store: Any, reactor: Any) -> Any:
    """Every SPARE_SWEEP_EVERY seconds, the spare queue files older than SPARE_MAX_AGE are unlinked."""
    from twisted.application.internet import TimerService
    from twisted.logger import Logger

    log = Logger(namespace="pymta.queue.store")

    def sweep() -> Any:
        d = store.sweep_spares(reactor.seconds() - SPARE_MAX_AGE)
        return d.addErrback(lambda f: log.error("cannot sweep spare queue files: {why}", why=f.getErrorMessage()))

    service = TimerService(SPARE_SWEEP_EVERY, sweep)
    service.clock = reactor
    return service


def _build_inbound(w: Wiring) -> None:
    """The receiver (policy, ACLs, limits, greylisting, scanning) and the MX listeners' SMTP factory."""
    from pymta.inbound.acl import AclPolicy
    from pymta.inbound.auth import SenderLogins
    from pymta.inbound.dnsbl import DNSBL
    from pymta.inbound.limits import ClientLimits, Greylist
    from pymta.inbound.receiver import InboundReceiver
    from pymta.smtp.replies import Reply
    from pymta.smtp.server import ConnectionSlots, ServerLimits, SMTPServerFactory
    from pymta.tls import ServerTLS

    config, reactor, top = w.config, w.reactor, w.top
    inbound_state = w.inbound_state = _inbound_state(config, reactor, main=w.main, shared=w.shared)
    CloseOnStop(inbound_state.close).setServiceParent(top)
    policy = w.policy = recipient_policy(config, reactor, w.quotas)
    w.receiver = InboundReceiver(
        config.hostname,
        policy,
        w.store,
        reactor,
        on_queued=w.notify,
        accounting=w.accounting,
        records_at_pickup=w.records_at_pickup,
        acl=cast("IPolicy", AclPolicy(cast("dict[str, Iterable[AclRule]]", config.acl))) if config.acl else None,
        limits=ClientLimits(
            reactor,
            config.limits.connections_per_client,
            config.limits.message_rate,
            config.limits.recipient_rate,
            state=inbound_state,
        ),
        greylist=Greylist(reactor, config.greylist.delay, config.greylist.expire, config.greylist.lifetime,
                          state=inbound_state)
        if config.greylist.enabled
        else None,
        suppression=w.suppression,
        dnsbl=DNSBL(w.resolver, config.dnsbl.zones, Reply(*config.dnsbl.reply)) if config.dnsbl.zones else None,
        resolver=w.resolver,
        reverse_lookup=config.smtp.reverse_lookup or any(r.rdns is not None for rules in config.acl.values() for r in rules),
        max_expanded=config.smtp.max_recipients + config.aliases.max_expansion,
        sender_login=SenderLogins.from_files(cast(str, config.submission.users_file), config.submission.sender_login_maps)
        if config.submission.listen and config.submission.sender_login == "strict"
        else None,
        free_space=w.free_space,
        space_needed=space_needed(config),
        sender_auth=w.sender_auth,
        scan=_scan_chain(config, reactor, top),
    )
    w.limits = ServerLimits(
        max_message_size=config.smtp.max_message_size,
        max_recipients=config.smtp.max_recipients,
        max_errors=config.smtp.max_errors,
        command_timeout=config.smtp.command_timeout,
        data_timeout=config.smtp.data_timeout,
        greet_pause=config.smtp.greet_pause,
        max_auth_failures=config.submission.max_auth_failures,
        min_data_rate=config.smtp.min_data_rate,
        max_session_time=config.smtp.max_session_time,
    )
    # [smtp] max_connections holds for the MX listeners together; each accepting process takes an
    # equal share. Submission listeners count apart, with the same cap.
    w.mx_slots = ConnectionSlots(-(-config.smtp.max_connections // w.accepting))
    server_tls = w.server_tls = ServerTLS(config.tls.cert, cast(str, config.tls.key)) if config.tls.cert else None
    hangup = ReloadOnHangup(server_tls.reload if server_tls is not None else w.reopen, reactor)
    if server_tls is not None:
        hangup.also.append(w.reopen)
    hangup.setServiceParent(top)
    if w.signer_sign is not None:
        on_hangup(top, reactor, w.sender_auth.signer.reload)  # DKIM keys
    if config.aliases.file or config.virtual:
        on_hangup(top, reactor, policy.tables.reload)  # the aliases file and [virtual] are read again
    w.factory = SMTPServerFactory(w.receiver, config.hostname, w.limits, reactor, tls_context_factory=server_tls,
                                  connections=w.mx_slots)  # fmt: skip
    w.drain.factories.append(w.factory)


def _build_admin(w: Wiring) -> None:
    """Operator suspensions, the queue operations behind the control socket, and the HTTP service."""
    from pymta.admin.control import control_service
    from pymta.admin.queue_ops import QueueOperations
    from pymta.state.suspensions import SQLiteSuspensions

    config, reactor, smtp_agent = w.config, w.reactor, w.smtp_agent
    suspensions = SQLiteSuspensions(os.path.join(config.state_dir, "suspensions.sqlite"), reactor, cluster=w.shared)
    smtp_agent.shaper.suspensions = suspensions
    operations = QueueOperations(
        w.store, w.manager if config.queue.deliver else None, smtp_agent.shaper, smtp_agent.selector, suspensions,
        w.webhooks,
    )  # fmt: skip
    control_service(config.control_socket, operations, reactor=reactor).setServiceParent(w.top)
    if config.http.listen or config.http.public_listen:
        from pymta.admin.http.service import build_http

        build_http(
            config, reactor, w.top, store=w.store, operations=operations, policy=w.policy, threadpool=w.pool,
            metrics=w.metrics, suppression=w.suppression, tagger=w.tagger, accounting=w.accounting,
            on_queued=w.notify, shaper=smtp_agent.shaper, agent=smtp_agent, sign=w.signer_sign,
            selector=smtp_agent.selector, records_at_pickup=w.records_at_pickup,
            events=w.journal,
        )  # fmt: skip


def _build_tls_and_submission_listeners(w: Wiring) -> None:
    """Implicit-TLS MX listeners (``[smtp] listen_tls``) and the authenticated submission listeners."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from pymta.inbound.auth import Authenticator, load_users
    from pymta.smtp.server import ConnectionSlots, SMTPServerFactory

    config, reactor, top = w.config, w.reactor, w.top
    for endpoint in config.smtp.listen_tls:
        implicit = SMTPServerFactory(w.receiver, config.hostname, w.limits, reactor, connections=w.mx_slots)
        w.drain.factories.append(implicit)
        tls_factory = TLSMemoryBIOFactory(w.server_tls, False, cast("IProtocolFactory", implicit))
        strports.service(endpoint, cast("IProtocolFactory", tls_factory), reactor=reactor).setServiceParent(top)
    if config.submission.listen:
        users = load_users(cast(str, config.submission.users_file))
        auth_pool = ThreadPool(minthreads=0, maxthreads=2, name="pymta-auth")
        ThreadPoolService(auth_pool).setServiceParent(top)
        auth = Authenticator(users, reactor, auth_pool, max_failures=config.submission.max_auth_failures)
        submission = SMTPServerFactory(w.receiver, config.hostname, w.limits, reactor, tls_context_factory=w.server_tls,
                                       authenticator=auth, auth_required=True,
                                       connections=ConnectionSlots(config.smtp.max_connections))  # fmt: skip
        w.drain.factories.append(submission)
        for endpoint in config.submission.listen:
            plain = implicit_tls_endpoint(endpoint)  # "ssl:465": implicit TLS with the [tls] certificate
            factory = submission if plain is None else TLSMemoryBIOFactory(w.server_tls, False, cast("IProtocolFactory", submission))
            strports.service(plain or endpoint, cast("IProtocolFactory", factory), reactor=reactor).setServiceParent(top)


def implicit_tls_endpoint(endpoint: str) -> str | None:
    """An ``ssl:`` endpoint as the ``tcp:`` one to listen on, TLS being added with the ``[tls]``
    certificate (reloaded on SIGHUP; certificate options in the string are ignored); None for
    other endpoints."""
    kind, _, rest = endpoint.partition(":")
    if kind != "ssl":
        return None
    ignored = ("certKey=", "privateKey=", "extraCertChain=", "sslmethod=", "dhParameters=")
    return "tcp:" + ":".join(part for part in rest.split(":") if not part.startswith(ignored))


def main_accepts(config: Config) -> bool:
    """Whether the main process serves the MX listeners: with listener workers it delivers and leaves
    accepting to them (one core each side: measured faster, at less CPU per message, than both sides
    in every process), unless it does not deliver (``[queue] deliver = false``)."""
    return config.smtp.processes <= 1 or not config.queue.deliver


def accepting_processes(config: Config) -> int:
    """How many processes accept on the MX listeners (the workers, and the main one if it does)."""
    return max(1, config.smtp.processes - (0 if main_accepts(config) else 1))


def _listen(config: Config, reactor: Any, factory: Any, top: service.MultiService, on_worker_ended: Any = None,
            stop_limit: float = 8.0) -> None:
    """The MX listeners; with ``[smtp] processes`` > 1, TCP ones are served by worker processes."""
    if config.smtp.processes <= 1:
        for endpoint in config.smtp.listen:
            strports.service(endpoint, factory, reactor=reactor).setServiceParent(top)
        return
    from pymta.workers import AdoptedPort, WorkerPool, listening_socket

    sockets = []
    for endpoint in config.smtp.listen:
        addresses = listener_addresses((endpoint,))
        if not addresses or endpoint.startswith("ssl:"):
            strports.service(endpoint, factory, reactor=reactor).setServiceParent(top)
            continue
        interface, port = addresses[0]
        try:
            sock = listening_socket(interface, port)
        except OSError as e:
            sys.stderr.write(f"pymta: cannot listen on {endpoint}: {e.strerror}\n")
            raise SystemExit(2) from None
        sockets.append(sock)
        if main_accepts(config):
            AdoptedPort(reactor, sock.fileno(), sock.family, factory).setServiceParent(top)
    if sockets:
        pool = WorkerPool(reactor, config.smtp.processes - 1, config.path, sockets, on_ended=on_worker_ended,
                          stop_limit=stop_limit)
        pool.setServiceParent(top)
        # The workers serve STARTTLS and log too: SIGHUP (certificate, logs) and SIGUSR1 (logs) reach them.
        for child in top:
            if isinstance(child, ReloadOnHangup):
                child.also.append(lambda signum=child.signum: pool.signal_all(int(signum)))


def on_hangup(top: service.MultiService, reactor: Any, action: Any) -> None:
    """Adds ``action`` to the tree's one SIGHUP handler (created when there is none yet)."""
    for child in top:
        if isinstance(child, ReloadOnHangup) and child.signum == signal.SIGHUP:
            child.also.append(action)
            return
    ReloadOnHangup(action, reactor).setServiceParent(top)


class ReloadOnHangup(service.Service):
    """SIGHUP reloads the certificate and reopens the logs; with ``signum=SIGUSR1``, logs only (the
    signal handler only schedules the work on the reactor)."""

    def __init__(self, reload: Any, reactor: Any, signum: signal.Signals = signal.SIGHUP) -> None:
        self.reload = reload
        self.reactor = reactor
        self.signum = signum
        self.previous: Any = None
        self.also: list[Any] = []  # further actions on the signal (e.g. tell the listener workers)

    def hangup(self) -> None:
        self.reload()
        for action in self.also:
            action()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.previous = signal.signal(self.signum, lambda *_: self.reactor.callFromThread(self.hangup))

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        if self.previous is not None:
            # Not back to the default action, which would end a process that is still stopping.
            signal.signal(self.signum, signal.SIG_IGN if self.previous == signal.SIG_DFL else self.previous)


def _log_reopener(accounting: Any) -> Any:
    """What SIGUSR1 and SIGHUP do for logrotate: reopen $PYMTA_LOG_FILE and the accounting log."""
    from pymta.log import reopen_log_files

    def reopen() -> None:
        reopen_log_files()
        if accounting is not None:
            accounting.reopen()

    return reopen


def _events(config: Config, reactor: Any, pool: Any, top: service.MultiService, accounting: Any) -> tuple[Any, ...]:
    """The event journal, the webhook senders that follow it, and the accounting log that also
    turns delivery outcomes into events (what the queue manager is given)."""
    from pymta.events.emit import AccountingEvents
    from pymta.events.journal import COMMIT_DELAY, EventJournal
    from pymta.events.webhooks import WebhookService, treq_post

    base = os.path.join(config.state_dir, "events")
    journal = EventJournal(os.path.join(base, "journal"), reactor, threadpool=pool, reactor=reactor, commit_delay=COMMIT_DELAY)
    CloseOnStop(journal.close).setServiceParent(top)
    webhooks = None
    if config.webhooks:
        post = treq_post(reactor, connect_timeout=min(h.timeout for h in config.webhooks))
        webhooks = WebhookService(config.webhooks, journal, os.path.join(base, "webhooks"), reactor, post,
                                  reactor=reactor, threadpool=pool)  # fmt: skip
        webhooks.setServiceParent(top)
    return journal, webhooks, AccountingEvents(journal, accounting)


def _mailbox_agent(config: Config, reactor: Any, pool: Any, top: service.MultiService, quotas: Any) -> Any:
    """Local delivery: Maildirs under state_dir/mail, or ``[mailbox] transport`` over LMTP."""
    mb = config.mailbox
    if mb.transport == "maildir":
        from pymta.inbound.mailbox import MaildirDeliveryAgent

        return MaildirDeliveryAgent(config.mail_dir, config.hostname, reactor=reactor, threadpool=pool,
                                    delimiter=config.domains.recipient_delimiter,
                                    delimiter_folders=mb.delimiter_folders, quotas=quotas,
                                    quota_action=mb.quota_action)  # fmt: skip
    from pymta.inbound.lmtp import LMTPDeliveryAgent

    agent = LMTPDeliveryAgent(mb.transport, config.hostname, reactor, timeout=mb.lmtp_timeout,
                              max_connections=mb.lmtp_connections, idle_timeout=mb.lmtp_idle)  # fmt: skip
    CloseOnStop(agent.close_idle).setServiceParent(top)
    return agent


def _local_submission(path: str, receiver: Any, hostname: str, limits: Any, reactor: Any, drain: Any,
                      top: service.MultiService) -> None:
    """``[sendmail] socket``: SMTP on a UNIX socket any local user may write to (``pymta-sendmail``)."""
    from pymta.inbound.local import LocalSubmissionFactory

    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    factory = LocalSubmissionFactory(receiver, hostname, limits, reactor)
    drain.factories.append(factory)
    escaped = path.replace("\\", "\\\\").replace(":", "\\:")
    strports.service(f"unix:{escaped}:mode=666:lockfile=1", cast("IProtocolFactory", factory), reactor=reactor).setServiceParent(top)


def _scan_chain(config: Config, reactor: Any, top: service.MultiService) -> Any:
    """``[scan]``: rspamd, then the milters in order (None when nothing is configured)."""
    sc = config.scan
    if not sc.rspamd and not sc.milter:
        return None
    from pymta.inbound.milter import MilterScanner
    from pymta.inbound.rspamd import RspamdScanner
    from pymta.inbound.scan import ScanChain

    scanners: list[Any] = []
    if sc.rspamd:
        rspamd = RspamdScanner(sc.rspamd, reactor, sc.timeout, sc.on_error)
        CloseOnStop(rspamd.close).setServiceParent(top)
        scanners.append(rspamd)
    for m in sc.milter:
        scanners.append(MilterScanner(m.socket, reactor, m.timeout or sc.timeout, m.on_error or sc.on_error))
    return ScanChain(scanners, reactor)


def _inbound_state(config: Config, reactor: Any, main: bool, shared: Any = None) -> Any:
    """The node's shared inbound state (per-client counts, rates, greylist) under state_dir, or
    the cluster's; the main process starts with no connection counted."""
    if shared is not None:
        from pymta.state.cluster import ClusterInboundState

        # Slots a previous run of this node held lapse within lease_ttl, as a dead node's do.
        return ClusterInboundState(shared, reactor, lease_ttl=config.cluster.lease_ttl)
    from pymta.state.local import LocalInboundState

    state = LocalInboundState(os.path.join(config.state_dir, "inbound.sqlite"), reactor, owner=os.getpid())
    if main:
        state.clear_connections()
    return state


def _feedback_parts(config: Config, reactor: Any, shared: Any = None) -> tuple[Any, Any]:
    """The suppression store (always) and the return-path tagger (with a bounce domain)."""
    from pymta.feedback.verp import Tagger

    fb = config.feedback
    store = suppression_store(config, reactor, shared)
    tagger = Tagger(fb.secret, fb.bounce_domain) if fb.bounce_domain and fb.secret else None
    return store, tagger


def _selector(config: Config, reactor: Any, shared: Any = None) -> Any:
    """Source IP pools and warm-up from ``[sources]``, ``[pools]``, ``[pool_select]`` (None without pools)."""
    if not config.pools:
        return None
    from pymta.outbound.pools import Pool, Source, SourceSelector, WarmupCounter

    sources = {
        name: Source(name, c.address, c.ehlo or config.hostname, c.warmup, c.warmup_start,
                     provider_ladders={k: tuple(v) for k, v in (c.warmup_provider or {}).items()})
        for name, c in config.sources.items()
    }
    pools = {
        name: Pool(name, [(sources[s], w) for s, w in (c.sources or {}).items()], c.spill) for name, c in config.pools.items()
    }
    sel = config.pool_select
    counter = WarmupCounter(os.path.join(config.state_dir, "warmup.sqlite"))
    w = config.warmup
    return SourceSelector(reactor, pools, sel.sender_domain, sel.auth_user, sel.default, counter,
                          bounce_rate=w.bounce_rate, deferral_rate=w.deferral_rate, min_sample=w.min_sample,
                          complaint_rate=w.complaint_rate, cluster=shared)  # fmt: skip


class ClusterStateService(service.Service):
    """Joins the cluster's shared state when the tree starts, leaves it when the tree closes."""

    stop_stage = CLOSE

    def __init__(self, state: Any) -> None:
        self.state = state

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.state.start()

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        return self.state.stop()


def _cluster_state(config: Config, reactor: Any, top: service.MultiService) -> Any:
    """The state shared by the cluster's nodes (``[cluster] backend = "redis"``), else None:
    a ``local`` node keeps its state in process as it always has."""
    if config.cluster.backend == "local":
        return None
    from pymta.state.cluster import make_cluster_state

    try:
        state = make_cluster_state(config, reactor)
    except OSError as e:
        raise StartupError(f"cannot read cluster.redis_password_file {config.cluster.redis_password_file}: "
                           f"{e.strerror}") from None  # fmt: skip
    ClusterStateService(state).setServiceParent(top)
    return state


def _shaper(config: Config, reactor: Any, shared: Any = None) -> Any:
    """Traffic shaping from ``[shaping]`` (limits default -> provider -> domain, backoff rules)."""
    import re

    from pymta.outbound.shaping import BackoffRule, Limits, Shaper

    sh = config.shaping

    def limits(c: Any) -> Limits:
        retry = (c.retry_initial, c.retry_max or max(c.retry_initial, config.queue.retry_max)) if c.retry_initial else None
        return Limits(c.connections, c.message_rate, c.messages_per_connection, c.recipients_per_message,
                      c.window, c.timezone, c.connection_rate, retry, c.per_source, c.dead_site_pause)  # fmt: skip

    # [outbound] max_connections_per_domain is the default connection cap; [shaping] may set any other.
    default = limits(sh.default).over(Limits(connections=config.outbound.max_connections_per_domain))
    return Shaper(
        reactor,
        default,
        {name: limits(c) for name, c in sh.domain.items()},
        {name: (c.mx_suffix, limits(c)) for name, c in sh.provider.items()},
        tuple(BackoffRule(re.compile(b.match, re.I), b.pause, b.rate, b.recover) for b in sh.backoff),
        cluster=shared,
        lease_ttl=config.cluster.lease_ttl,
    )


def free_octets(path: str) -> int:
    """Octets an unprivileged process may still write on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def space_needed(config: Config) -> int:
    """Octets a MAIL needs free for the queue (Postfix's rule): min_free plus one and a half
    messages of the largest size."""
    return int(config.queue.min_free + config.smtp.max_message_size * 3 // 2)


def spare_space_low(config: Config, free_space: Callable[[], int]) -> Callable[[], bool]:
    """Whether the queue's file system lacks room for :func:`space_needed` plus every spare queue
    file it may keep (``spare_files`` of at most INLINE_UNLINK_MAX octets): the spares are then
    unlinked before they could make a MAIL be refused."""
    from pymta.queue.store import INLINE_UNLINK_MAX

    margin = space_needed(config) + config.queue.spare_files * INLINE_UNLINK_MAX
    return lambda: free_space() <= margin


class FreeSpace:
    """``free_octets(path)``, asked of the kernel at most once every ``interval`` seconds: every
    MAIL checks it, and the margin it is checked against (min_free plus one and a half of the
    largest message) outlasts what a second of mail can write."""

    def __init__(self, path: str, clock: Any, interval: float = 1.0) -> None:
        self.path, self.clock, self.interval = path, clock, interval
        self._value = 0
        self._until = float("-inf")

    def __call__(self) -> int:
        now = self.clock.seconds()
        if now >= self._until:
            self._value, self._until = free_octets(self.path), now + self.interval
        return self._value


def listener_addresses(endpoints: tuple[str, ...]) -> list[tuple[str, int]]:
    """(interface, port) of our TCP listeners, for loop detection (0.0.0.0 / :: for all)."""
    out = []
    for text in endpoints:
        kind, _, rest = text.partition(":")
        if kind not in ("tcp", "tcp6", "ssl"):
            continue
        parts = rest.split(":")
        port_text = parts[0][5:] if parts[0].startswith("port=") else parts[0]
        interface = "::" if kind == "tcp6" else "0.0.0.0"
        for part in parts[1:]:
            if part.startswith("interface="):
                interface = part[len("interface=") :].replace("\\:", ":")
        if port_text.isdigit():
            out.append((interface, int(port_text)))
    return out


def client_timeouts(out: Any) -> Any:
    """The SMTP client's stage timeouts from ``[outbound] timeouts`` (and ``connect_timeout``)."""
    from pymta.smtp.client import ClientTimeouts

    stages = dict(out.timeouts or {})
    if out.connect_timeout is not None:
        stages["connect"] = out.connect_timeout
    return ClientTimeouts(**stages)


class TLSReportService(service.Service):
    """Sends the daily TLS reports (RFC 8460) while the MTA runs."""

    def __init__(self, reporter: Any) -> None:
        self.reporter = reporter

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.reporter.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.reporter.stop()


def _tls_reporter(config: Config, reactor: Any, resolver: Any, store: Any, top: service.MultiService) -> Any:
    """The TLS report sender of ``[tlsrpt]`` (None unless enabled); reports go through our queue."""
    if not config.tlsrpt.enabled or not config.queue.deliver:
        return None
    from pymta.outbound.tlsrpt import TLSCounts, TLSReporter, https_poster

    def submit(envelope: Any, body: bytes) -> Any:
        return store.enqueue(envelope, body).addCallback(lambda _: reporter.notify(envelope.qid))

    t = config.tlsrpt
    reporter = TLSReporter(reactor, resolver, TLSCounts(os.path.join(config.state_dir, "tlsrpt.sqlite")),
                           t.organization or config.hostname, t.contact or f"postmaster@{config.hostname}",
                           config.hostname, submit, https_poster(reactor, reactor, config.outbound.tls_ca_file))  # fmt: skip
    TLSReportService(reporter).setServiceParent(top)
    CloseOnStop(reporter.counts.close).setServiceParent(top)  # after the deliveries that count sessions
    return reporter


def _tls_report_inbox(config: Config, top: service.MultiService) -> Any:
    """Where TLS reports about our domains are kept (None without ``[tlsrpt] report_addresses``)."""
    if not config.tlsrpt.report_addresses:
        return None
    from pymta.feedback.tlsrpt import TLSReportInbox, inbox_paths

    inbox = TLSReportInbox(*inbox_paths(config.state_dir), addresses=config.tlsrpt.report_addresses)
    CloseOnStop(inbox.close).setServiceParent(top)
    return inbox


def _outbound_agent(config: Config, reactor: Any, resolver: Any, tls_reports: Any = None, shared: Any = None) -> Any:
    """The SMTP delivery agent for relayed and forwarded recipients."""
    from pymta.outbound.dane import DANE
    from pymta.outbound.delivery import SMTPDeliveryAgent
    from pymta.outbound.routes import Router
    from pymta.outbound.tlspolicy import MTASTS
    from pymta.tls import client_tls

    out = config.outbound
    router = Router(
        resolver,
        smtp_port=out.smtp_port,
        smarthost=out.smarthost,
        routes=config.routes,
        own_listeners=listener_addresses(config.smtp.listen),
        local_addresses=("127.0.0.1", "::1"),
    )
    policies = out.tls_policy or {}

    def tls_policy_for(domain: str) -> str:
        return policies.get(domain, out.tls)

    return SMTPDeliveryAgent(
        reactor,
        router,
        config.hostname,
        shaper=_shaper(config, reactor, shared),
        selector=_selector(config, reactor, shared),
        max_connections=out.max_connections,
        max_messages_per_connection=out.max_messages_per_connection,
        max_recipients_per_transaction=out.max_recipients_per_transaction,
        source_address=out.source_address,
        timeouts=client_timeouts(out),
        tls_policy_for=tls_policy_for,
        tls_context_for=lambda host, verify: client_tls(host, verify, out.tls_ca_file),
        mta_sts=MTASTS(reactor, resolver, os.path.join(config.state_dir, "mta-sts"), ca_file=out.tls_ca_file,
                       https_port=out.mta_sts_port, skip=set(policies)) if out.mta_sts else None,
        dane=DANE(resolver) if config.dns.dnssec else None,
        tls_reports=tls_reports,
    )
