"""Behaviour every IResolver must show, over one zone: a mixin over a ``make_resolver(zone)`` hook.

The zone is in ``tests.dnsserver.Zone``'s format; ``make_resolver`` returns a resolver answering
from it (the real one through a DNS server on loopback, the fake from the data itself).
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface.verify import verifyObject

from pymta.dns import DNSPermanentError, DNSTemporaryError
from pymta.interfaces import IResolver

ZONE = {
    "remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test."]},
    "mx1.remote.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "nomx.test": {"A": ["127.0.0.5"]},
    "nullmx.test": {"MX": ["0 ."]},
    "real.test": {"TXT": ['"v=spf1 -all"']},
    "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.remote.test."]},
}
SERVFAIL = ("broken.test",)


class ResolverContract:
    """The IResolver contract."""

    def make_resolver(self, zone, servfail):
        raise NotImplementedError

    def resolver(self):
        return self.make_resolver(ZONE, SERVFAIL)

    def test_resolver_provides_the_interface(self):
        self.assertTrue(verifyObject(IResolver, self.resolver()))

    @defer.inlineCallbacks
    def test_mx_hosts_come_in_preference_order(self):
        result = yield self.resolver().lookup_mx("Remote.Test.")
        self.assertEqual((result.domain, result.hosts, result.null, result.implicit),
                         ("remote.test", ("mx1.remote.test", "mx2.remote.test"), False, False))  # fmt: skip

    @defer.inlineCallbacks
    def test_no_mx_is_the_domain_itself_and_a_null_mx_takes_no_mail(self):
        implicit = yield self.resolver().lookup_mx("nomx.test")
        self.assertEqual((implicit.hosts, implicit.implicit), (("nomx.test",), True))
        null = yield self.resolver().lookup_mx("nullmx.test")
        self.assertEqual((null.hosts, null.null), ((), True))

    @defer.inlineCallbacks
    def test_addresses_txt_and_ptr(self):
        resolver = self.resolver()
        self.assertEqual(sorted((yield resolver.lookup_addresses("mx1.remote.test"))), ["127.0.0.2", "::1"])
        self.assertEqual((yield resolver.lookup_txt("real.test")), ["v=spf1 -all"])
        self.assertEqual((yield resolver.lookup_ptr("127.0.0.2")), ["mx1.remote.test"])

    @defer.inlineCallbacks
    def test_a_missing_name_is_permanent_and_a_failing_server_temporary(self):
        resolver = self.resolver()
        for call, name in ((resolver.lookup_mx, "nowhere.test"), (resolver.lookup_addresses, "nowhere.test"),
                           (resolver.lookup_ptr, "127.0.0.99"), (resolver.lookup_ptr, "not-an-ip")):  # fmt: skip
            with self.assertRaises(DNSPermanentError):
                yield call(name)
        with self.assertRaises(DNSTemporaryError):
            yield resolver.lookup_mx("broken.test")

    @defer.inlineCallbacks
    def test_an_unsigned_zone_is_not_secure(self):
        resolver = self.resolver()
        self.assertFalse((yield resolver.addresses_secure("mx1.remote.test")))
        tlsa = yield resolver.lookup_tlsa("mx1.remote.test", 25)
        self.assertEqual((tlsa.name, tlsa.records, tlsa.secure), ("_25._tcp.mx1.remote.test", (), False))
