"""The inbound side of the feedback loop: mail to the bounce domain and the feedback addresses is
parsed, mapped back to the recipient it is about through a signed token, and fed to the
suppression store. Nothing unsigned or forged ever suppresses anyone (no backscatter effect).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.auth.verdicts import recorded_dkim
from pymta.envelope import DELIVERED, DeliveryResult, Envelope, Recipient
from pymta.feedback.classify import bounce_verdict
from pymta.feedback.parse import ARF, AUTOREPLY, DSN, Report, parse_message
from pymta.feedback.verp import TRACE_HEADER, UNSUBSCRIBE, Tagger
from pymta.interfaces import IDeliveryAgent

log = Logger(namespace="pymta.feedback")


@implementer(IDeliveryAgent)
class FeedbackProcessor:
    """Delivery agent for the ``feedback`` route."""

    def __init__(
        self,
        suppression: Any,
        tagger: Tagger | None,
        complaint_addresses: tuple[str, ...] = (),
        reply_addresses: tuple[str, ...] = (),
        reply_agent: IDeliveryAgent | None = None,
        reply_mailbox: str | None = None,
        accounting: Any = None,
        sources: Any = None,
        parser: Callable[[bytes], defer.Deferred[Report]] | None = None,
        authserv_id: str | None = None,
        tls_reports: Any = None,
        events: Any = None,
    ) -> None:
        self.suppression = suppression
        self.tagger = tagger
        self.complaint_addresses = {a.lower() for a in complaint_addresses}
        self.reply_addresses = {a.lower() for a in reply_addresses}
        self.reply_agent = reply_agent
        self.reply_mailbox = reply_mailbox
        self.accounting = accounting
        self.sources = sources  # the warm-up's source selector: bounces and complaints count against a source
        self.tls_reports = tls_reports  # pymta.feedback.tlsrpt.TLSReportInbox for [tlsrpt] report_addresses
        # parse off the reactor (pymta.feedback.pool.ParsePool.parse); in-line when not given (tests)
        self.parser = parser or (lambda raw: defer.succeed(parse_message(raw)))
        self.authserv_id = authserv_id  # whose Authentication-Results to trust (inbound verdicts on)
        self.events = events  # pymta.events.journal.EventJournal: complaint, unsubscribe, reply events

    @defer.inlineCallbacks
    def deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> Any:
        results = []
        report = None
        forged = False
        for rcpt in recipients:
            if self.tls_reports is not None and rcpt.address.lower() in self.tls_reports.addresses:
                outcome = self.tls_reports.take(envelope.qid, body)  # a TLS report (RFC 8460): its own inbox
                results.append(DeliveryResult(rcpt.address, DELIVERED, 250, "2.0.0", f"feedback processed: {outcome}"))
                continue
            if report is None:
                report = yield self.parser(body)
                forged = report.kind == ARF and bool(self.authserv_id) and recorded_dkim(body, cast(str, self.authserv_id)) == "fail"
                if forged:
                    log.info("complaint for {to} ignored: its DKIM signature fails", to=[r.address for r in recipients],
                             qid=envelope.qid, kind=report.kind, event="feedback")  # fmt: skip
            if forged:
                text = "feedback processed: ignored: complaint whose DKIM signature fails"
                results.append(DeliveryResult(rcpt.address, DELIVERED, 250, "2.0.0", text))
                continue
            outcome = self.handle(rcpt.address, envelope, report)
            if outcome == "keep" and self.reply_agent is not None and self.reply_mailbox:
                [kept] = yield cast(Any, self.reply_agent).deliver(envelope, [Recipient(self.reply_mailbox, route="local")], body)
                results.append(DeliveryResult(rcpt.address, kept.status, kept.code, kept.enhanced,
                                              f"reply kept in {self.reply_mailbox}: {kept.text}"))  # fmt: skip
                continue
            results.append(DeliveryResult(rcpt.address, DELIVERED, 250, "2.0.0", f"feedback processed: {outcome}"))
        return results

    def handle(self, address: str, envelope: Envelope, report: Report) -> str:
        """Apply one report that arrived for ``address``; returns what was done (for the log)."""
        address = address.lower()
        outcome = self._handle(address, envelope, report)
        if outcome in ("keep", "kept as reply"):
            self._emit("reply", None, report.from_address, report)
        log.info("feedback for {to}: {kind} {action} -> {outcome}", to=address, kind=report.kind, action=report.action,
                 outcome=outcome, reason=report.reason, recipients=report.recipients, event="feedback")  # fmt: skip
        if self.accounting is not None:
            self.accounting.record("feedback", qid=envelope.qid, recipient=address, kind=report.kind,
                                   action=report.action, reason=report.reason, outcome=outcome)  # fmt: skip
        return outcome

    def _handle(self, address: str, envelope: Envelope, report: Report) -> str:
        tagger = self.tagger
        parsed = tagger.parse_return_path(address) if tagger is not None else None
        if parsed is not None and parsed[0] == UNSUBSCRIBE:
            candidates = sorted({a.lower() for a in (envelope.sender, report.from_address) if a})
            match = cast(Tagger, tagger).match_recipients(address, candidates, kind=UNSUBSCRIBE)  # parsed: a tagger
            if match is None:
                return "ignored: unsubscribe token does not match its sender"
            _, who, scope = match
            for rcpt in who:
                self.suppression.add(rcpt, "one-click unsubscribe", "unsubscribe", scope or None)
                self._emit("unsubscribe", match[0], rcpt, report, scope=scope or None)
            return f"unsubscribed {', '.join(who)} from {scope or 'all'}"
        if parsed is not None:
            if report.kind == ARF:
                return self._complaint(report)
            match = cast(Tagger, tagger).match_recipients(address, report.recipients)
            if match is None:
                return "ignored: no recipient of this report matches the signed return path"
            qid, who, _ = match
            if report.kind == AUTOREPLY:
                return f"auto-reply from {', '.join(who)}"
            if report.kind != DSN:
                return "kept as reply" if self.reply_mailbox else "ignored: not a bounce"
            done = []
            for detail in report.details:
                if detail.address not in who:
                    continue
                if detail.action == "failed":
                    verdict = bounce_verdict(detail.reason, detail.hard, detail.status)
                    if verdict is None:
                        done.append(f"{detail.address} undecided {detail.reason or 'undefined'}: not counted")
                        continue
                    self.suppression.record_bounce(detail.address, detail.reason or "undefined", verdict == "hard")
                    if self.sources is not None:
                        self.sources.feedback(qid, "bounced")
                    done.append(f"{detail.address} {verdict} {detail.reason}")
                else:
                    done.append(f"{detail.address} {detail.action}")
            return f"bounce of {qid}: " + "; ".join(done)
        if address in self.complaint_addresses or report.kind == ARF:
            return self._complaint(report)
        if address in self.reply_addresses:
            if report.kind == AUTOREPLY:
                return "auto-reply noted"
            return "keep"
        return "ignored"

    def _complaint(self, report: Report) -> str:
        if report.kind != ARF:
            return "ignored: not a complaint report"
        headers = report.original_headers or {}
        token = headers.get(TRACE_HEADER.lower())
        traced = self.tagger.parse_trace(token) if (self.tagger is not None and token) else None
        if traced is None:
            return "ignored: complaint without a genuine trace header"
        qid, rcpt = traced
        self.suppression.record_complaint(rcpt, f"complaint ({report.feedback_type or 'abuse'})")
        self._emit("complaint", qid, rcpt, report, feedback_type=report.feedback_type or "abuse")
        if self.sources is not None:
            self.sources.feedback(qid, "complaint")
        return f"complaint about {qid} for {rcpt}: suppressed"

    def _emit(self, type_: str, qid: str | None, recipient: str | None, report: Report, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(type_, qid=qid, recipient=recipient, feedback=report.kind, **fields)
