"""Fakes shared by tests, each run through the contract tests of its interface (``tests/contract_*``):
a delivery agent answering per recipient and attempt, a resolver over a static zone, an inbound
state whose connection answers come late; and the adapter that runs a Deferred-answering inbound
state through the synchronous contract."""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from pymta.dns import DNSPermanentError, DNSTemporaryError, MXResult, TLSAResult, to_ascii
from pymta.envelope import DELIVERED, FAILED, DeliveryResult
from pymta.interfaces import IDeliveryAgent, IInboundState, IResolver

OK = (DELIVERED, 250, "2.0.0", "ok")


@implementer(IDeliveryAgent)
class ScriptedDeliveryAgent:
    """``script[address]`` is a list of answers, one per attempt (the last one repeats); an answer
    is (status, code, enhanced, text[, extra]) or an Exception to fail the whole call; ``extra``
    becomes the result's ``extra`` (e.g. ``hold_until``, ``retry``). Unknown addresses
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
            status, code, enhanced, text, *extra = answer
            results.append(DeliveryResult(r.address, status, code, enhanced, text, remote_mta="mx.test [192.0.2.1]",
                                          extra=dict(*extra)))  # fmt: skip
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


def deferred(code: int = 450, enhanced: str = "4.2.0", text: str = "try later", extra: dict | None = None) -> tuple:
    from pymta.envelope import DEFERRED

    return (DEFERRED, code, enhanced, text, extra or {})


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


@implementer(IResolver)
class StaticResolver:
    """An :class:`IResolver` over a static zone in ``tests.dnsserver.Zone``'s format
    (``{"name": {"MX": ["10 mx.name."], "A": [...], "PTR": [...]}}``): unknown names are
    NXDOMAIN (:class:`DNSPermanentError`), names in ``servfail`` fail temporarily. Nothing is
    DNSSEC-validated."""

    def __init__(self, records: dict[str, dict[str, list[str]]], servfail=()) -> None:
        self.records = {to_ascii(k): v for k, v in records.items()}
        self.servfail = {to_ascii(n) for n in servfail}

    def _rrs(self, name: str, rdtype: str) -> list[str]:
        name = to_ascii(name)
        if name in self.servfail:
            raise DNSTemporaryError(f"{name} {rdtype}: SERVFAIL")
        if name not in self.records:
            raise DNSPermanentError(f"{name} does not exist (NXDOMAIN)")
        return list(self.records[name].get(rdtype, ()))

    def lookup_mx(self, domain):
        try:
            name = to_ascii(domain)
            mx = sorted((int(p), h.rstrip(".").lower()) for p, h in (r.split() for r in self._rrs(name, "MX")))
        except (DNSPermanentError, DNSTemporaryError) as e:
            return defer.fail(e)
        if not mx:
            return defer.succeed(MXResult(name, (name,), implicit=True, preferences=(0,)))
        if len(mx) == 1 and mx[0][1] == "":
            return defer.succeed(MXResult(name, (), null=True))
        return defer.succeed(MXResult(name, tuple(h for _, h in mx), preferences=tuple(p for p, _ in mx)))

    def lookup_addresses(self, host):
        try:
            return defer.succeed(self._rrs(host, "AAAA") + self._rrs(host, "A"))
        except (DNSPermanentError, DNSTemporaryError) as e:
            return defer.fail(e)

    def lookup_txt(self, name):
        try:
            return defer.succeed([r.strip('"') for r in self._rrs(name, "TXT")])
        except (DNSPermanentError, DNSTemporaryError) as e:
            return defer.fail(e)

    def lookup_ptr(self, address):
        import ipaddress

        try:
            name = ipaddress.ip_address(address).reverse_pointer
            return defer.succeed([r.rstrip(".").lower() for r in self._rrs(name, "PTR")])
        except ValueError:
            return defer.fail(DNSPermanentError(f"not an IP address: {address!r}"))
        except (DNSPermanentError, DNSTemporaryError) as e:
            return defer.fail(e)

    def lookup_tlsa(self, host, port=25):
        return defer.succeed(TLSAResult(f"_{int(port)}._tcp.{to_ascii(host)}", (), False))

    def addresses_secure(self, host):
        return defer.succeed(False)


def fired(answer):
    """The value of an answer that has already fired (a node alone answers at once)."""
    if not isinstance(answer, defer.Deferred):
        return answer
    got = []
    answer.addBoth(got.append)
    assert got, "the answer has not fired"
    if isinstance(got[0], Failure):
        got[0].raiseException()
    return got[0]


@implementer(IInboundState)
class Answered:
    """The contract's view of a state answering with Deferreds: ``wait`` turns one into its value."""

    def __init__(self, state, wait=fired):
        self.state = state
        self.owner = state.owner
        self.wait = wait

    def acquire_connection(self, key, limit):
        return self.wait(self.state.acquire_connection, key, limit)

    def release_connection(self, key):
        return self.wait(self.state.release_connection, key)

    def take(self, name, key, rate):
        return self.wait(self.state.take, name, key, rate)

    def greylist(self, triple, delay, expire, lifetime):
        return self.wait(self.state.greylist, triple, delay, expire, lifetime)

    def release_owner(self, owner):
        return self.wait(self.state.release_owner, owner)

    def clear_connections(self):
        return self.wait(self.state.clear_connections)

    def close(self):
        self.state.close()


@implementer(IInboundState)
class LateInboundState:
    """An :class:`IInboundState` across the network over ``state``: each answer to
    ``acquire_connection`` is a Deferred that fires (with ``state``'s answer at that moment) only
    when the test calls :meth:`answer`; everything else goes straight to ``state``."""

    def __init__(self, state) -> None:
        self.state = state
        self.owner = state.owner
        self.pending: list[defer.Deferred] = []

    def acquire_connection(self, key, limit):
        self.pending.append(defer.Deferred().addCallback(lambda _: self.state.acquire_connection(key, limit)))
        return self.pending[-1]

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)

    def release_connection(self, key):
        return self.state.release_connection(key)

    def take(self, name, key, rate):
        return self.state.take(name, key, rate)

    def greylist(self, triple, delay, expire, lifetime):
        return self.state.greylist(triple, delay, expire, lifetime)

    def release_owner(self, owner):
        return self.state.release_owner(owner)

    def clear_connections(self):
        return self.state.clear_connections()

    def close(self):
        self.state.close()
