"""After a message is durable in the queue: the ``queued`` log event, the accounting records and
the queue manager's notification — the same for SMTP and for the HTTP injection API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pymta.envelope import Envelope

log = Logger(namespace="pymta.inbound")


def record_queued(
    envelope: Envelope,
    accounting: Any = None,
    on_queued: Callable[[str], Any] | None = None,
    **fields: Any,
) -> defer.Deferred[Any]:
    """``fields`` (reply code, listener, campaign...) go into the log event and accounting records.
    The Deferred fires once the received records are on disk: only then may the client be told."""
    log.info(
        "queued {qid} from <{sender}> for {nrcpt} recipient(s), {size} octets",
        event="queued",
        qid=envelope.qid,
        client=envelope.client_address,
        sender=envelope.sender,
        recipients=[r.address for r in envelope.recipients],
        nrcpt=len(envelope.recipients),
        size=envelope.size,
        **fields,
    )
    records = []
    if accounting is not None:
        tags = {k: envelope.extra[k] for k in ("campaign", "tenant", "metadata") if envelope.extra.get(k)}
        for r in envelope.recipients:
            records.append(accounting.record(
                "received", qid=envelope.qid, sender=envelope.sender, recipient=r.address,
                size=envelope.size, client=envelope.client_address, route=r.route, **tags,
            ))  # fmt: skip
    if on_queued is not None:
        try:
            on_queued(envelope.qid)
        except Exception:
            log.failure("queue manager notification failed for {qid}", qid=envelope.qid)
    return defer.DeferredList(records) if records else defer.succeed(None)
