"""The stores and the recipient policy built from the configuration: one place, used by the service
(``pymta.tap``) and the command-line tools alike, so that both open the same files the same way."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from pymta.config import Config, load_config


class WallClock:
    """``seconds()`` of the wall clock, for tools that run without a reactor."""

    @staticmethod
    def seconds() -> float:
        return time.time()


def queue_store(config: Config, reactor: Any, threadpool: Any, space_low: Callable[[], bool] | None = None) -> Any:
    """The maildir queue spool of ``config`` (file I/O on ``threadpool``); ``space_low``: see
    :class:`pymta.queue.store.MaildirQueueStore`."""
    from pymta.queue.store import MaildirQueueStore

    return MaildirQueueStore(config.queue_dir, reactor=reactor, threadpool=threadpool, fsync=config.queue.fsync,
                             spares=config.queue.spare_files, space_low=space_low)  # fmt: skip


def suppression_store(config: Config, clock: Any, shared: Any = None, start: bool = True) -> Any:
    """The suppression list with the configured soft-bounce policy; with a cluster state ``shared``,
    a local replica kept current from it (started unless ``start`` is false: a command that only
    pushes its own changes)."""
    from pymta.feedback.suppression import SuppressionPolicy, SuppressionStore

    fb = config.feedback
    policy = SuppressionPolicy(fb.soft_bounce_threshold, fb.soft_bounce_window, fb.soft_bounce_suppress)
    os.makedirs(os.path.dirname(config.suppression_db), exist_ok=True)
    if shared is None:
        return SuppressionStore(config.suppression_db, clock, policy)
    from pymta.state.replica import ReplicatedSuppressionStore

    store = ReplicatedSuppressionStore(config.suppression_db, clock, policy, cluster=shared)
    if start:
        store.start()
    return store


def address_rewriting(config: Config, clock: Any) -> dict[str, Any]:
    """RelayPolicy's aliases, virtual maps, recipient delimiter and SRS from the configuration.
    A malformed aliases file raises TableError (``FILE:LINE: ...``)."""
    from pymta.inbound.aliases import AliasTables
    from pymta.inbound.srs import SRS

    srs = SRS(config.srs.secret, config.srs.domain or config.hostname, config.srs.max_age) if config.srs.secret else None
    tables = AliasTables(config.aliases.file, config.virtual, lambda: load_config(config.path).virtual)
    return {"tables": tables, "srs": srs, "delimiter": config.domains.recipient_delimiter, "clock": clock,
            "max_depth": config.aliases.max_depth, "max_expansion": config.aliases.max_expansion}  # fmt: skip


def recipient_policy(config: Config, clock: Any, quotas: Any = None) -> Any:
    """The RCPT-stage :class:`pymta.inbound.policy.RelayPolicy` of ``config`` (what ``pymta-map`` shows
    is what the listener decides)."""
    from pymta.inbound.policy import RelayPolicy
    from pymta.inbound.quota import Quotas

    fb = config.feedback
    return RelayPolicy(
        config.domains.local,
        config.domains.mailboxes,
        config.domains.relay_from,
        config.domains.forward,
        config.mail_dir,
        feedback_domains=[fb.bounce_domain] if fb.bounce_domain else [],
        feedback_addresses=[*fb.complaint_addresses, *fb.reply_addresses, *config.tlsrpt.report_addresses],
        postmaster=config.postmaster,
        hostname=config.hostname,
        **address_rewriting(config, clock),
        quotas=quotas if quotas is not None else Quotas(config.mailbox.quota, config.mailbox.quotas),
    )
