"""MX, address and TXT lookups against a real DNS server on loopback."""

from __future__ import annotations

import random

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from pymta.dns import DNSPermanentError, DNSTemporaryError, Resolver, to_ascii
from tests.dnsserver import DNSServer, Zone

ZONE = {
    "remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test.", "10 mx3.remote.test."]},
    "mx1.remote.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "mx3.remote.test": {"A": ["127.0.0.4"]},
    "nomx.test": {"A": ["127.0.0.5"]},
    "nullmx.test": {"MX": ["0 ."]},
    "alias.test": {"CNAME": ["real.test."]},
    "real.test": {"MX": ["5 mx2.remote.test."], "TXT": ['"v=spf1 -all"']},
    "xn--bcher-kva.test": {"MX": ["10 mx2.remote.test."]},
    "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.remote.test."]},
}


class ResolverTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = DNSServer(Zone(ZONE, servfail=["broken.test"], silent=["slow.test"])).start()
        self.addCleanup(self.server.stop)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.clock = task.Clock()
        self.resolver = Resolver(reactor, self.pool, [self.server.address], timeout=0.5, clock=self.clock,
                                 rng=random.Random(3))  # fmt: skip

    @defer.inlineCallbacks
    def test_mx_in_preference_order_with_equal_preferences_shuffled(self):
        seen = set()
        for seed in range(12):
            self.resolver.rng = random.Random(seed)
            self.resolver.clear_cache()
            result = yield self.resolver.lookup_mx("Remote.Test.")
            assert result.hosts[-1] == "mx2.remote.test"
            assert set(result.hosts[:2]) == {"mx1.remote.test", "mx3.remote.test"}
            seen.add(result.hosts[:2])
        assert len(seen) == 2  # both orders of the equal-preference pair occur

    @defer.inlineCallbacks
    def test_no_mx_means_the_domain_itself(self):
        result = yield self.resolver.lookup_mx("nomx.test")
        assert result.implicit
        assert result.hosts == ("nomx.test",)
        addresses = yield self.resolver.lookup_addresses("nomx.test")
        assert addresses == ["127.0.0.5"]

    @defer.inlineCallbacks
    def test_null_mx(self):
        result = yield self.resolver.lookup_mx("nullmx.test")
        assert result.null
        assert result.hosts == ()

    @defer.inlineCallbacks
    def test_cname_is_followed(self):
        result = yield self.resolver.lookup_mx("alias.test")
        assert result.hosts == ("mx2.remote.test",)
        txt = yield self.resolver.lookup_txt("real.test")
        assert txt == ["v=spf1 -all"]

    @defer.inlineCallbacks
    def test_idna_names(self):
        assert to_ascii("Bücher.test") == "xn--bcher-kva.test"
        result = yield self.resolver.lookup_mx("bücher.test")
        assert result.hosts == ("mx2.remote.test",)

    @defer.inlineCallbacks
    def test_ipv6_and_ipv4_interleaved(self):
        addresses = yield self.resolver.lookup_addresses("mx1.remote.test")
        assert addresses == ["::1", "127.0.0.2"]
        self.resolver.prefer_ipv6 = False
        self.resolver.clear_cache()
        addresses = yield self.resolver.lookup_addresses("mx1.remote.test")
        assert addresses == ["127.0.0.2", "::1"]

    @defer.inlineCallbacks
    def test_nxdomain_is_permanent(self):
        with self.assertRaises(DNSPermanentError):
            yield self.resolver.lookup_mx("nowhere.test")
        with self.assertRaises(DNSPermanentError):
            yield self.resolver.lookup_addresses("nowhere.test")

    @defer.inlineCallbacks
    def test_servfail_and_timeout_are_temporary(self):
        with self.assertRaises(DNSTemporaryError):
            yield self.resolver.lookup_mx("broken.test")
        with self.assertRaises(DNSTemporaryError):
            yield self.resolver.lookup_mx("slow.test")

    @defer.inlineCallbacks
    def test_answers_are_cached_for_their_ttl(self):
        yield self.resolver.lookup_mx("remote.test")
        asked = len(self.server.zone.queries)
        yield self.resolver.lookup_mx("remote.test")
        assert len(self.server.zone.queries) == asked
        self.clock.advance(61)
        yield self.resolver.lookup_mx("remote.test")
        assert len(self.server.zone.queries) == asked + 1

    @defer.inlineCallbacks
    def test_negative_answers_are_cached_too(self):
        for _ in range(2):
            with self.assertRaises(DNSPermanentError):
                yield self.resolver.lookup_mx("nowhere.test")
        assert self.server.zone.queries.count(("nowhere.test.", "MX")) == 1

    @defer.inlineCallbacks
    def test_reverse_lookup(self):
        names = yield self.resolver.lookup_ptr("127.0.0.2")
        assert names == ["mx1.remote.test"]
        with self.assertRaises(DNSPermanentError):
            yield self.resolver.lookup_ptr("127.0.0.99")

    def test_invalid_names_are_permanent_errors(self):
        with self.assertRaises(DNSPermanentError):
            to_ascii("bad..name\u0000.test")
