"""The relay's side of the feedback loop: a delivery agent wrapped so that suppressed recipients
are never sent to, tagged mail gets a signed return path and trace header, and the relay's own
permanent failures feed the suppression store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.envelope import FAILED, DeliveryResult, Envelope, Recipient
from pymta.feedback.classify import bounce_verdict
from pymta.feedback.verp import TRACE_HEADER, Tagger
from pymta.interfaces import IDeliveryAgent, ISuppressionList

log = Logger(namespace="pymta.feedback")

Classifier = Callable[[str | None, str, int], tuple[str, bool]]  # (status, text, code) -> (reason, hard)


def sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2].lower()


@implementer(IDeliveryAgent)
class FeedbackGate:
    """Wraps the outbound :class:`IDeliveryAgent`."""

    def __init__(
        self,
        inner: IDeliveryAgent,
        suppression: ISuppressionList | None = None,
        tagger: Tagger | None = None,
        tag_domains: Iterable[str] = (),
        classify: Classifier | None = None,
        unsubscribe: bool = False,
        unsubscribe_url: str | None = None,
        signer: Any = None,
    ) -> None:
        self.inner = inner
        self.suppression = suppression
        self.tagger = tagger
        self.tag_domains = frozenset(d.lower() for d in tag_domains)
        self.classify = classify
        self.unsubscribe = unsubscribe
        self.unsubscribe_url = unsubscribe_url.rstrip("/") if unsubscribe_url else None
        # RFC 8058 §4: the one-click headers must be DKIM-covered. They are per recipient, so they
        # get a signature of their own here (pymta.auth.dkim.DkimSigner), timed at the arrival:
        # every attempt sends the same bytes.
        self.signer = signer

    def tags(self, envelope: Envelope) -> bool:
        if self.tagger is None or not envelope.sender or envelope.sender[:5].upper() in ("SRS0=", "SRS1="):
            return False  # forwarded mail keeps its SRS sender: bounces go back to the original sender
        return not self.tag_domains or sender_domain(envelope.sender) in self.tag_domains

    def deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> defer.Deferred[Any]:
        try:
            return self._deliver(envelope, recipients, body)
        except Exception:
            return defer.fail()

    def _deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> defer.Deferred[Any]:
        results: dict[int, DeliveryResult] = {}
        to_send: list[tuple[int, Recipient]] = []
        scope = sender_domain(envelope.sender) if envelope.sender else None
        for i, rcpt in enumerate(recipients):
            entry = cast(Any, self.suppression).is_suppressed(rcpt.address, scope) if self.suppression is not None else None
            if entry is not None:
                text = f"Recipient suppressed ({entry['source']}: {entry['reason']})"
                log.info("not sending {qid} to suppressed {rcpt}: {why}", qid=envelope.qid, rcpt=rcpt.address, why=text)
                results[i] = DeliveryResult(rcpt.address, FAILED, 550, "5.7.1", text, extra={"suppressed": True})
            else:
                to_send.append((i, rcpt))

        def in_order(_: Any = None) -> list[DeliveryResult]:
            return [results[i] for i in range(len(recipients))]

        if not to_send:
            return defer.succeed(in_order())
        if not self.tags(envelope):  # the common case: one batch, one send, chained (no generator)
            return self._send(envelope, to_send, body).addCallback(self._gather, envelope, to_send, results, scope).addCallback(in_order)
        # With return-path tags, one recipient a batch (each has its own return path).
        return self._one_by_one(envelope, to_send, body, results, scope).addCallback(in_order)

    @defer.inlineCallbacks
    def _one_by_one(self, envelope: Envelope, to_send: list[tuple[int, Recipient]], body: bytes,
                    results: dict[int, DeliveryResult], scope: str | None) -> Any:  # fmt: skip
        for item in to_send:
            got = yield self._send(envelope, [item], body)
            self._gather(got, envelope, [item], results, scope)

    def _gather(self, got: list[DeliveryResult], envelope: Envelope, batch: list[tuple[int, Recipient]],
                results: dict[int, DeliveryResult], scope: str | None) -> None:  # fmt: skip
        """One batch's results into ``results`` (by recipient index), learnt from."""
        for (i, _), result in zip(batch, got, strict=True):
            results[i] = result
            self._learn(envelope, result, scope)

    def _send(self, envelope: Envelope, batch: list[tuple[int, Recipient]], body: bytes) -> defer.Deferred[Any]:
        rcpts = [r for _, r in batch]
        if not self.tags(envelope):
            return defer.maybeDeferred(cast(Any, self.inner).deliver, envelope, rcpts, body)  # zope methods are written without self
        rcpt = rcpts[0]
        tagger = cast(Tagger, self.tagger)  # tags() is true only with a tagger
        tagged = dataclasses.replace(envelope, sender=tagger.return_path(envelope.qid, rcpt.address))
        headers = f"{TRACE_HEADER}: {tagger.trace_value(envelope.qid, rcpt.address)}\r\n"
        if self.unsubscribe:
            headers += self.unsubscribe_headers(envelope, rcpt.address)
        data = headers.encode() + body
        if self.unsubscribe and self.signer is not None:
            data = self.signer.signatures(data, timestamp=envelope.arrival) + data
        return defer.maybeDeferred(cast(Any, self.inner).deliver, tagged, rcpts, data)

    def unsubscribe_headers(self, envelope: Envelope, recipient: str) -> str:
        """RFC 8058 one-click: the HTTPS URI on the public listener (``[http] public_url``), which
        Gmail and Yahoo require, and a signed mailto on the bounce domain (``u-`` token)."""
        domain = sender_domain(envelope.sender)
        tagger = cast(Tagger, self.tagger)  # called for tagged mail only
        address = tagger.unsubscribe_address(envelope.qid, recipient, domain)
        targets = [f"<mailto:{address}?subject=unsubscribe>"]
        if self.unsubscribe_url:
            token = tagger.unsubscribe_token(envelope.qid, recipient, domain)
            targets.insert(0, f"<{self.unsubscribe_url}/u/{token}>")
        folded = ",\r\n ".join(targets)
        return f"List-Unsubscribe: {folded}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"

    def _learn(self, envelope: Envelope, result: DeliveryResult, scope: str | None) -> None:
        """The relay's own 5xx (e.g. user unknown at RCPT) feeds the same store."""
        if self.suppression is None or self.classify is None or result.status != FAILED:
            return
        if result.extra.get("suppressed") or not result.remote_mta or result.code < 500:
            return
        reason, hard = self.classify(result.enhanced or None, result.text, result.code)
        verdict = bounce_verdict(reason, hard, result.enhanced or None, result.code)
        log.info("{rcpt} failed at {mx}: {reason} ({kind})", rcpt=result.address, mx=result.remote_mta,
                 reason=reason, kind=verdict or "undecided, not counted", qid=envelope.qid)  # fmt: skip
        if verdict is not None:
            cast(Any, self.suppression).record_bounce(result.address, reason, hard=verdict == "hard")  # zope methods are written without self
