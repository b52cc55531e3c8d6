"""The relay's side of the loop: suppressed recipients are not sent to, tagged mail is signed,
and the relay's own permanent failures are learned."""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer

from pymta.envelope import DELIVERED, FAILED, DeliveryResult, Envelope, Recipient, new_qid
from pymta.feedback.gate import FeedbackGate
from pymta.feedback.suppression import SuppressionStore
from pymta.feedback.verp import TRACE_HEADER, Tagger
from pymta.interfaces import IDeliveryAgent
from tests.fakes import TempDirMixin


@implementer(IDeliveryAgent)
class RecordingAgent:
    """Answers per address from a table; records every call (envelope, addresses, body)."""

    def __init__(self, answers: dict[str, tuple[str, int, str, str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[Envelope, list[str], bytes]] = []

    def deliver(self, envelope, recipients, body):
        self.calls.append((envelope, [r.address for r in recipients], body))
        out = []
        for r in recipients:
            status, code, enhanced, text = self.answers.get(r.address, (DELIVERED, 250, "2.0.0", "ok"))
            out.append(DeliveryResult(r.address, status, code, enhanced, text, remote_mta="mx.remote.example [192.0.2.1]"))
        return defer.succeed(out)


def classify(status, text, code):
    return ("userunknown", True) if status == "5.1.1" else ("blocked", False)


class FeedbackGateTests(TempDirMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = SuppressionStore(os.path.join(self.tmpdir(), "s.sqlite"), self.clock)
        self.addCleanup(self.store.close)
        self.tagger = Tagger("0123456789abcdef-secret", "bounces.example.test")
        self.envelope = Envelope(qid=new_qid(), sender="news@example.test", recipients=[])

    def deliver(self, gate, addresses, body=b"Subject: x\r\n\r\nhi\r\n"):
        results = []
        gate.deliver(self.envelope, [Recipient(a) for a in addresses], body).addBoth(results.append)
        return results[0]

    def test_suppressed_recipients_fail_with_the_reason_and_are_not_sent(self) -> None:
        self.store.add("carol@remote.example", "userunknown", "bounce")
        inner = RecordingAgent({})
        results = self.deliver(FeedbackGate(inner, self.store), ["carol@remote.example", "dave@remote.example"])
        assert [r.status for r in results] == [FAILED, DELIVERED]
        assert (results[0].code, results[0].enhanced) == (550, "5.7.1")
        assert "userunknown" in results[0].text
        assert [addresses for _, addresses, _ in inner.calls] == [["dave@remote.example"]]

    def test_tagged_mail_goes_one_recipient_per_transaction_with_signed_return_path(self) -> None:
        inner = RecordingAgent({})
        gate = FeedbackGate(inner, self.store, self.tagger, ["example.test"], unsubscribe=True)
        self.deliver(gate, ["carol@remote.example", "dave@remote.example"])
        assert len(inner.calls) == 2
        for envelope, [address], body in inner.calls:
            assert self.tagger.match_recipients(envelope.sender, [address]) == (self.envelope.qid, [address], "")
            first = body.split(b"\r\n", 1)[0].decode()
            assert first.startswith(TRACE_HEADER + ": ")
            assert self.tagger.parse_trace(first.split(": ", 1)[1]) == (self.envelope.qid, address)
            assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in body
        assert self.envelope.sender == "news@example.test"  # the queued envelope is untouched

    def test_other_sender_domains_and_bounces_are_not_tagged(self) -> None:
        inner = RecordingAgent({})
        gate = FeedbackGate(inner, self.store, self.tagger, ["other.example"])
        self.deliver(gate, ["carol@remote.example", "dave@remote.example"])
        assert len(inner.calls) == 1
        assert inner.calls[0][0].sender == "news@example.test"

    def test_the_relays_own_hard_failures_are_suppressed(self) -> None:
        inner = RecordingAgent({"carol@remote.example": (FAILED, 550, "5.1.1", "no such user")})
        self.deliver(FeedbackGate(inner, self.store, classify=classify), ["carol@remote.example"])
        assert self.store.is_suppressed("carol@remote.example")["reason"] == "userunknown"

    def test_the_relays_own_failures_suppress_for_good_only_when_hard_and_permanent(self) -> None:
        from pymta.feedback.classify import classify as real_classify

        inner = RecordingAgent({
            "dave@remote.example": (FAILED, 550, "5.0.0", "mystery refusal nobody has a rule for"),
            "erin@remote.example": (FAILED, 552, "5.2.2", "mailbox full"),
        })  # fmt: skip
        gate = FeedbackGate(inner, self.store, classify=real_classify)
        for _ in range(self.store.policy.soft_threshold + 1):
            self.deliver(gate, ["dave@remote.example"])
        assert self.store.is_suppressed("dave@remote.example") is None  # onhold: undecided, never counted
        self.deliver(gate, ["erin@remote.example"])
        assert self.store.is_suppressed("erin@remote.example") is None  # soft: one is not enough


class OneClickSigningTests(TempDirMixin, unittest.TestCase):
    """RFC 8058 §4: the per-recipient one-click headers are DKIM-covered, the same bytes every attempt."""

    def test_one_click_headers_are_signed_and_a_retry_sends_the_same_bytes(self) -> None:
        import dkim
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from pymta.auth.dkim import DkimSigner, SigningKey

        clock = task.Clock()
        signer = DkimSigner({}, "t", clock)
        key = SigningKey("example.test", "s1", "ed25519-sha256", ed25519.Ed25519PrivateKey.generate(), "-",
                         headers=("from", "subject", "list-unsubscribe", "list-unsubscribe-post"), oversign=("from",))
        signer.keys = {"example.test": [key]}
        store = SuppressionStore(os.path.join(self.tmpdir(), "s.sqlite"), clock)
        self.addCleanup(store.close)
        tagger = Tagger("0123456789abcdef-secret", "bounces.example.test")
        envelope = Envelope(qid=new_qid(), sender="news@example.test", recipients=[], arrival=1796000000.0)
        inner = RecordingAgent({})
        gate = FeedbackGate(inner, store, tagger, ["example.test"], unsubscribe=True, signer=signer)
        body = b"From: news@example.test\r\nSubject: x\r\n\r\nhi\r\n"
        gate.deliver(envelope, [Recipient("carol@remote.example")], body)
        clock.advance(3600)  # a retry an hour later
        gate.deliver(envelope, [Recipient("carol@remote.example")], body)
        [(_, _, first), (_, _, second)] = inner.calls
        assert first == second
        assert first.startswith(b"DKIM-Signature:")
        assert b"t=1796000000;" in first
        h = first.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n ", b"")
        assert b"list-unsubscribe:list-unsubscribe-post" in h
        record = key.public_record().encode()
        assert dkim.verify(first, dnsfunc=lambda name, timeout=5: record)
        assert not dkim.verify(first.replace(b"mailto:u-", b"mailto:x-"), dnsfunc=lambda name, timeout=5: record)
