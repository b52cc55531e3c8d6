"""After a message is durable in the queue: the ``queued`` log event, the accounting records and
the queue manager's notification — the same for SMTP and for the HTTP injection API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pymta.admin.accounting import RECEIVED_AT_PICKUP, received_records
from pymta.envelope import Envelope

log = Logger(namespace="pymta.inbound")


def record_queued(
    envelope: Envelope,
    accounting: Any = None,
    on_queued: Callable[[str], Any] | None = None,
    **fields: Any,
) -> defer.Deferred[Any]:
    """``fields`` (reply code, listener, campaign...) go into the log event. The Deferred fires once
    the received records are on disk (only then may the client be told), at once when they are
    left to the queue manager (see :func:`leave_records_to_pickup`)."""
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
    if accounting is not None and not envelope.extra.get(RECEIVED_AT_PICKUP):
        records = received_records(accounting, envelope)
    if on_queued is not None:
        try:
            on_queued(envelope.qid)
        except Exception:
            log.failure("queue manager notification failed for {qid}", qid=envelope.qid)
    return defer.DeferredList(records) if records else defer.succeed(None)


def leave_records_to_pickup(envelope: Envelope, accounting: Any, delivering: bool) -> None:
    """Before ``envelope`` is queued into incoming/: when a queue manager delivers from this queue,
    it writes the received records (:data:`RECEIVED_AT_PICKUP`); mail for hold/, or queued where
    nothing delivers (``[queue] deliver = false``), has them written before the 250."""
    if accounting is not None and delivering:
        envelope.extra[RECEIVED_AT_PICKUP] = True
