"""Scripted fakes shared by tests: a delivery agent answering per recipient and attempt."""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import defer
from zope.interface import implementer

from pymta.envelope import DELIVERED, FAILED, DeliveryResult
from pymta.interfaces import IDeliveryAgent

OK = (DELIVERED, 250, "2.0.0", "ok")


@implementer(IDeliveryAgent)
class ScriptedDeliveryAgent:
    """``script[address]`` is a list of answers, one per attempt (the last one repeats); an answer
    is (status, code, enhanced, text) or an Exception to fail the whole call. Unknown addresses
    are delivered. ``hold=True`` keeps every call pending in ``pending`` until fired."""

    def __init__(self, script: dict[str, list] | None = None, hold: bool = False) -> None:
        self.script = script or {}
        self.hold = hold
        self.calls: list[tuple[str, list[str], bytes]] = []
        self.pending: list[tuple[defer.Deferred, list[DeliveryResult]]] = []
        self.attempts: dict[str, int] = {}

    def deliver(self, envelope, recipients, body):
        self.calls.append((envelope.qid, [r.address for r in recipients], body))
        results = []
        for r in recipients:
            n = self.attempts.get(r.address, 0)
            self.attempts[r.address] = n + 1
            answers = self.script.get(r.address, [OK])
            answer = answers[min(n, len(answers) - 1)]
            if isinstance(answer, Exception):
                return defer.fail(answer)
            status, code, enhanced, text = answer
            results.append(DeliveryResult(r.address, status, code, enhanced, text, remote_mta="mx.test [192.0.2.1]"))
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, results))
            return d
        return defer.succeed(results)

    def release_all(self) -> None:
        pending, self.pending = self.pending, []
        for d, results in pending:
            d.callback(results)


def failed(code: int = 550, enhanced: str = "5.1.1", text: str = "no such user") -> tuple:
    return (FAILED, code, enhanced, text)


def deferred(code: int = 450, enhanced: str = "4.2.0", text: str = "try later") -> tuple:
    from pymta.envelope import DEFERRED

    return (DEFERRED, code, enhanced, text)


class TempDirMixin:
    """``self.tmpdir()`` for trial TestCases: a fresh directory removed after the test (trial's
    own mktemp would write inside the working tree when run under pytest)."""

    def tmpdir(self) -> str:
        path = tempfile.mkdtemp(prefix="pymta-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path


class Sessions:
    """Records the TLS sessions a delivery agent counts for TLS reports (``TLSReporter.session``)."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def session(self, *args) -> None:
        self.seen.append(args)
