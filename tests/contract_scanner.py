"""Behaviour every content scanner (``pymta.inbound.scan.Scanner``) must show, as the scan chain
reads it: a mixin over a ``make_scanner(answer)`` hook returning a scanner whose peer answers
``answer`` for the next message — ``"accept"`` (the message may go on), ``"reject"``,
``"tempfail"`` or ``"broken"`` (an answer outside the scanner's protocol).

The scanner boundary is a ``typing.Protocol``, not a zope interface, so the attributes the chain
reads (``name``, ``timeout``, ``on_error``, ``scan``) are checked one by one."""

from __future__ import annotations

from twisted.internet import defer

from pymta.inbound.scan import ACCEPT, REJECT, TEMPFAIL, ScanError, ScanRequest, Verdict

MESSAGE = b"Received: from x\r\nFrom: s@remote.test\r\nSubject: one\r\n\r\nbody\r\n"
REQUEST = ScanRequest("Q1", "s@remote.test", ["a@example.test"], MESSAGE)


class ScannerContract:
    """The scanner contract."""

    on_error = TEMPFAIL

    def make_scanner(self, answer: str):
        raise NotImplementedError

    def test_scanner_has_what_the_chain_reads(self):
        scanner = self.make_scanner("accept")
        self.assertIsInstance(scanner.name, str)
        self.assertTrue(scanner.name)
        self.assertGreater(scanner.timeout, 0)
        self.assertIn(scanner.on_error, (ACCEPT, TEMPFAIL))
        self.assertTrue(callable(scanner.scan))

    @defer.inlineCallbacks
    def test_a_clean_message_is_accepted(self):
        verdict = yield self.make_scanner("accept").scan(REQUEST)
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual((verdict.action, verdict.reply), (ACCEPT, None))

    @defer.inlineCallbacks
    def test_a_refusal_comes_with_a_reply_of_its_class(self):
        for answer, action, first in (("reject", REJECT, "5"), ("tempfail", TEMPFAIL, "4")):
            verdict = yield self.make_scanner(answer).scan(REQUEST)
            self.assertEqual(verdict.action, action)
            self.assertEqual((str(verdict.reply.code)[0], verdict.reply.enhanced[0]), (first, first))

    @defer.inlineCallbacks
    def test_an_answer_outside_the_protocol_is_a_scan_error(self):
        with self.assertRaises(ScanError):
            yield self.make_scanner("broken").scan(REQUEST)
