"""Inbound verdicts (SPF, DKIM, DMARC, ARC) against a table of cases, the Authentication-Results
field, and the same through pymta's resolver and loopback DNS."""

from __future__ import annotations

import time

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from pymta.auth import verdicts as V
from pymta.auth.accept import SenderAuth
from pymta.auth.dkim import DkimSigner, SigningKey, sign_message
from pymta.dns import Resolver
from tests.dnsserver import DNSServer, Zone
from tests.sessions import Accepted, Sess, Txn

RSA = rsa.generate_private_key(65537, 2048)
OTHER = rsa.generate_private_key(65537, 2048)


class StaticDNS(V.SyncDNS):
    def __init__(self, records: dict[tuple[str, str], list[str]], temporary: set[str] = frozenset()) -> None:
        self.records = {(n.lower(), t): v for (n, t), v in records.items()}
        self.temporary = temporary
        self.asked: list[tuple[str, str]] = []

    def query(self, name: str, rdtype: str) -> list[str]:
        name = name.lower().rstrip(".")
        self.asked.append((name, rdtype))
        if name in self.temporary:
            raise V.TempDNSError(f"{name}: timeout")
        return list(self.records.get((name, rdtype), []))


def key(domain: str = "example.org", selector: str = "s1", private=RSA) -> SigningKey:
    return SigningKey(domain, selector, "rsa-sha256", private, "-", headers=("from", "to", "subject"), oversign=("from",))


def record(k: SigningKey) -> str:
    return k.public_record()


def message(from_addr: str = "news@example.org", body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    return extra + b"From: " + from_addr.encode() + b"\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\n" + body


def signed(msg: bytes, k: SigningKey | None = None) -> bytes:
    return sign_message(msg, k or key(), int(time.time())) + msg


BASE = {
    ("example.org", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
    ("soft.example", "TXT"): ["v=spf1 ~all"],
    ("two.example", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
    ("bad.example", "TXT"): ["v=spf1 ip4:not-an-ip -all"],
    ("inc.example", "TXT"): ["v=spf1 include:example.org -all"],
    ("s1._domainkey.example.org", "TXT"): [record(key())],
    ("gone._domainkey.example.org", "TXT"): ["v=DKIM1; k=rsa; p="],
    ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject; sp=quarantine; adkim=r; aspf=r"],
    ("_dmarc.strict.example", "TXT"): ["v=DMARC1; p=reject; adkim=s; aspf=s"],
    ("_dmarc.broken.example", "TXT"): ["v=DMARC1; p=maybe"],
    ("_dmarc.twice.example", "TXT"): ["v=DMARC1; p=none", "v=DMARC1; p=reject"],
    ("s1._domainkey.other.example", "TXT"): [record(key("other.example", private=OTHER))],
    ("mail.example.net", "A"): ["198.51.100.7"],
    ("example.net", "TXT"): ["v=spf1 a:mail.example.net -all"],
}


def dns(**changes) -> StaticDNS:
    records = dict(BASE)
    temporary = set(changes.pop("temporary", ()))
    records.update(changes.get("records", {}))
    return StaticDNS(records, temporary)


# -- SPF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "sender", "expected"),
    [
        ("192.0.2.10", "a@example.org", "pass"),
        ("203.0.113.1", "a@example.org", "fail"),
        ("203.0.113.1", "a@soft.example", "softfail"),
        ("203.0.113.1", "a@norecord.example", "none"),
        ("203.0.113.1", "a@two.example", "permerror"),  # two SPF records
        ("203.0.113.1", "a@bad.example", "permerror"),  # a malformed mechanism
        ("192.0.2.10", "a@inc.example", "pass"),  # include:
        ("198.51.100.7", "a@example.net", "pass"),  # a: through an A lookup
        ("2001:db8::1", "a@example.org", "fail"),
    ],
)
def test_spf_table(ip, sender, expected):
    assert V.check_spf(dns(), ip, sender, "helo.example")[0] == expected


def test_spf_dns_failure_is_temperror():
    assert V.check_spf(dns(temporary={"example.org"}), "192.0.2.10", "a@example.org", "h")[0] == "temperror"


def test_spf_of_the_null_sender_checks_the_helo_name():
    assert V.check_spf(dns(), "192.0.2.10", "", "example.org")[0] == "pass"


def test_spf_lookup_limit_is_permerror():
    records = {(f"l{i}.example", "TXT"): [f"v=spf1 include:l{i + 1}.example -all"] for i in range(15)}
    assert V.check_spf(dns(records=records), "192.0.2.1", "a@l0.example", "h")[0] == "permerror"


# -- DKIM -------------------------------------------------------------------------------------------


def results(msg: bytes, d: StaticDNS | None = None) -> list[tuple[str, str]]:
    return [(r.result, r.reason) for r in V.check_dkim(msg, d or dns())]


def test_dkim_pass_and_a_changed_byte_fails():
    msg = signed(message())
    assert results(msg) == [("pass", "")]
    assert results(msg.replace(b"Hello.", b"Hell0."))[0][0] == "fail"
    assert results(msg.replace(b"Subject: hi", b"Subject: ho"))[0][0] == "fail"


def test_dkim_without_signature_is_none():
    assert results(message()) == []
    assert V.summarise_dkim([]) == "none"


def test_dkim_revoked_key_fails_and_a_missing_key_is_permerror():
    assert results(signed(message(), key(selector="gone"))) == [("fail", "key revoked")]
    assert results(signed(message(), key(selector="nokey")))[0] == ("permerror", "no key")


def test_dkim_key_lookup_failure_is_temperror():
    got = results(signed(message()), dns(temporary={"s1._domainkey.example.org"}))
    assert got[0][0] == "temperror"


def test_dkim_l_tag_leaving_content_unsigned_is_policy_not_pass():
    pem = RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    msg = message()
    sig = dkim.sign(msg, b"s1", b"example.org", pem, include_headers=[b"from", b"to", b"subject"], length=True)
    assert results(sig + msg) == [("pass", "")]
    appended = sig + msg + b"Click here: http://evil.example/\r\n"
    assert results(appended)[0][0] == "policy"
    assert V.summarise_dkim(V.check_dkim(appended, dns())) == "fail"


@pytest.mark.parametrize(
    "header",
    [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\r\n",  # no s=, b=, bh=, h=
        b"DKIM-Signature: garbage without tags\r\n",
        b"DKIM-Signature: v=1; a=rsa-md5; d=example.org; s=s1; h=from; bh=AA==; b=AA==\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from; bh=!!!; b=@@@\r\n",
        b"DKIM-Signature: \xff\xfe\r\n",
    ],
)
def test_malformed_signatures_are_permerror_or_fail_never_an_exception(header):
    got = V.check_dkim(header + message(), dns())
    assert len(got) == 1
    assert got[0].result in ("permerror", "fail")


def test_at_most_eight_signatures_are_checked():
    msg = message()
    for _ in range(12):
        msg = signed(msg)
    assert len(V.check_dkim(msg, dns())) == V.MAX_SIGNATURES


# -- DMARC ------------------------------------------------------------------------------------------


def evaluate(msg: bytes, ip: str = "203.0.113.1", sender: str = "bounce@example.org", d=None) -> V.Verdicts:
    return V.evaluate(msg, d or dns(), ip, "mail.sender.example", sender)


def test_dmarc_pass_by_aligned_dkim_although_spf_fails():
    v = evaluate(signed(message()))
    assert (v.spf, v.dkim, v.dmarc, v.dmarc_policy) == ("fail", "pass", "pass", "reject")


def test_dmarc_pass_by_aligned_spf_without_dkim():
    v = evaluate(message(), ip="192.0.2.9")
    assert (v.spf, v.dkim, v.dmarc) == ("pass", "none", "pass")


def test_dmarc_fail_when_nothing_aligns_and_p_reject_applies():
    v = evaluate(signed(message(), key("other.example", private=OTHER)), sender="x@other.example")
    assert v.dkim == "pass"  # a valid signature, but by another domain
    assert (v.dmarc, v.dmarc_policy) == ("fail", "reject")


def test_dmarc_subdomain_uses_the_organisational_record_and_sp():
    v = evaluate(message("news@mail.example.org"), sender="x@elsewhere.example")
    assert (v.dmarc, v.dmarc_policy, v.header_from) == ("fail", "quarantine", "mail.example.org")
    relaxed = evaluate(signed(message("news@mail.example.org")))
    assert relaxed.dmarc == "pass"  # d=example.org aligns with mail.example.org (relaxed)


def test_dmarc_strict_alignment_needs_the_exact_domain():
    k = key("example.org")
    v = evaluate(signed(message("news@strict.example"), k), sender="x@strict.example")
    assert v.dmarc == "fail"


def test_dmarc_without_record_is_none_and_dns_failure_temperror():
    assert evaluate(message("a@norecord.example"), sender="a@norecord.example").dmarc == "none"
    v = evaluate(message(), d=dns(temporary={"_dmarc.example.org"}))
    assert v.dmarc == "temperror"


def test_malformed_or_duplicate_dmarc_records_are_permerror():
    assert evaluate(message("a@broken.example"), sender="a@broken.example").dmarc == "permerror"
    assert evaluate(message("a@twice.example"), sender="a@twice.example").dmarc == "permerror"


def test_dmarc_with_two_from_addresses_is_permerror():
    v = evaluate(message("a@example.org, b@example.org"))
    assert v.dmarc == "permerror"


def test_organisational_domain_from_the_bundled_list():
    assert V.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert V.organizational_domain("mail.example.org") == "example.org"
    assert V.organizational_domain("mx.example.test") == "example.test"


# -- ARC ----------------------------------------------------------------------------------------------


def sealer(clock=None) -> SenderAuth:
    signer = DkimSigner({}, "t", clock or task.Clock())
    signer.keys = {"forward.example": [key("forward.example", "arc")]}
    return SenderAuth(clock or task.Clock(), None, "mx.forward.example", signer=signer, verify=True,
                      dns_factory=dns)  # fmt: skip


def arc_dns() -> StaticDNS:
    d = dns()
    d.records[("arc._domainkey.forward.example", "TXT")] = [record(key("forward.example", "arc"))]
    return d


def test_arc_sealed_by_the_forwarder_validates_and_breaks_when_changed():
    clock = task.Clock()
    clock.advance(time.time())
    auth = sealer(clock)
    auth.dns_factory = arc_dns
    _, body = auth.inbound(signed(message()), "192.0.2.9", "h.example", "a@example.org", ["bob@forward.example"])
    assert body.startswith(b"ARC-Seal: i=1;")
    assert b"ARC-Message-Signature: i=1;" in body
    assert b"ARC-Authentication-Results: i=1; mx.forward.example;" in body
    assert V.check_arc(body, arc_dns()) == ("pass", V.check_arc(body, arc_dns())[1])
    assert V.check_arc(body.replace(b"Hello.", b"Hel1o."), arc_dns())[0] == "fail"
    assert V.check_arc(message(), arc_dns())[0] == "none"


def test_arc_key_failure_is_temperror_and_garbage_fails():
    clock = task.Clock()
    clock.advance(time.time())
    auth = sealer(clock)
    auth.dns_factory = arc_dns
    _, body = auth.inbound(message(), "192.0.2.9", "h", "a@example.org", ["bob@forward.example"])
    d = arc_dns()
    d.temporary = {"arc._domainkey.forward.example"}
    assert V.check_arc(body, d)[0] == "temperror"
    assert V.check_arc(b"ARC-Seal: i=1; nonsense\r\n" + message(), arc_dns())[0] == "fail"


# -- the header field ------------------------------------------------------------------------------


def test_forged_results_for_our_id_are_removed_and_others_kept():
    forged = (b"Authentication-Results: mx.example.test;\r\n\tdkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: (comment) MX.Example.Test; spf=pass\r\n"
              b"Authentication-Results: other.example; spf=fail\r\n")  # fmt: skip
    cleaned, removed = V.remove_forged(forged + message(), "mx.example.test")
    assert removed == 2
    assert cleaned == b"Authentication-Results: other.example; spf=fail\r\n" + message()


def test_authentication_results_field_parses_with_authres():
    v = evaluate(signed(signed(message()), key(selector="gone")), ip="192.0.2.9")
    field = V.authentication_results("mx.example.test", v)
    parsed = authres.AuthenticationResultsHeader.parse(field.decode().strip())
    assert parsed.authserv_id == "mx.example.test"
    methods = [(r.method, r.result) for r in parsed.results]
    assert ("spf", "pass") in methods
    assert ("dmarc", "pass") in methods
    assert ("arc", "none") in methods
    assert ("dkim", "pass") in methods
    assert ("dkim", "fail") in methods
    assert V.recorded_dkim(field + message(), "mx.example.test") == "pass"
    assert V.recorded_dkim(field + message(), "other.example") is None


def test_unverified_message_bytes_never_raise():
    for junk in (b"", b"\r\n\r\n", b"no header at all", b"From: \xff\r\n\r\n", b"DKIM-Signature:\r\n\r\n"):
        v = V.evaluate(junk, dns(), "203.0.113.1", "", "")
        assert v.dmarc in V.RESULTS
        assert v.dkim in V.RESULTS


# -- through pymta's resolver and loopback DNS -------------------------------------------------------------


class ResolverDNSTests(unittest.TestCase):
    def setUp(self) -> None:
        zone = {name: {rdtype: [f'"{v}"' if rdtype == "TXT" else v for v in values]}
                for (name, rdtype), values in BASE.items() if rdtype != "TXT" or len(values[0]) < 250}  # fmt: skip
        zone["s1._domainkey.example.org"] = {"TXT": [" ".join(f'"{c}"' for c in _chunks(record(key())))]}
        self.server = DNSServer(Zone(zone, silent=["_dmarc.slow.example"])).start()
        self.addCleanup(self.server.stop)
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.auth_pool = ThreadPool(1, 2)
        self.auth_pool.start()
        self.addCleanup(self.auth_pool.stop)
        self.resolver = Resolver(reactor, self.pool, [self.server.address], timeout=0.3)
        self.auth = SenderAuth(reactor, self.auth_pool, "mx.example.test", resolver=self.resolver, verify=True,
                               dmarc_reject=True)  # fmt: skip

    def session(self, sender: str) -> Sess:
        txn = Txn(sender=sender, recipients=[Accepted("alice@example.test")])
        txn.notes["routes"] = {"alice@example.test": ("local", "alice@example.test")}
        return Sess(peer_address="192.0.2.9", helo_name="mail.example.org", transaction=txn)

    @defer.inlineCallbacks
    def test_verdicts_through_the_resolver_and_our_field_on_top(self):
        session = self.session("a@example.org")
        forged = b"Authentication-Results: mx.example.test; dkim=pass\r\n"
        body = yield self.auth.accept(session, forged + signed(message()), trusted=False)
        verdicts = session.transaction.notes["auth"]
        assert (verdicts.spf, verdicts.dkim, verdicts.dmarc) == ("pass", "pass", "pass")
        assert body.startswith(b"Authentication-Results: mx.example.test;")
        assert body.count(b"Authentication-Results:") == 1

    @defer.inlineCallbacks
    def test_dmarc_reject_is_550_571(self):
        session = self.session("x@elsewhere.example")
        reply = yield self.auth.accept(session, message(), trusted=False)
        assert (reply.code, reply.enhanced) == (550, "5.7.1")
        assert "example.org" in reply.text

    @defer.inlineCallbacks
    def test_a_dns_timeout_is_temperror_and_the_message_is_kept(self):
        session = self.session("a@slow.example")
        body = yield self.auth.accept(session, message("a@slow.example"), trusted=False)
        assert isinstance(body, bytes)
        assert body.endswith(message("a@slow.example"))
        assert session.transaction.notes["auth"].dmarc == "temperror"

    @defer.inlineCallbacks
    def test_stopping_ends_lookups_in_flight_so_the_pool_can_be_joined(self):
        slow = Resolver(reactor, self.pool, [self.server.address], timeout=4)  # the silent name: 8 s
        auth = SenderAuth(reactor, self.auth_pool, "mx.example.test", resolver=slow, verify=True, dns_budget=60)
        session = self.session("a@slow.example")
        d = auth.accept(session, message("a@slow.example"), trusted=False)
        reactor.callLater(0.5, auth.stop)
        started = reactor.seconds()
        body = yield d
        assert reactor.seconds() - started < 4  # well below the resolver's 8 s: the stop ended the wait
        assert body.endswith(message("a@slow.example"))
        assert session.transaction.notes["auth"].dmarc == "temperror"

    @defer.inlineCallbacks
    def test_trusted_clients_get_no_verdicts(self):
        session = self.session("a@example.org")
        body = yield self.auth.accept(session, message(), trusted=True)
        assert body == message()
        assert "auth" not in session.transaction.notes


def _chunks(text: str) -> list[str]:
    return [text[i : i + 200] for i in range(0, len(text), 200)]


def test_ptr_names_map_back_to_addresses():
    assert V._ptr_address("9.2.0.192.in-addr.arpa") == "192.0.2.9"
    name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    assert V._ptr_address(name) == "2001:db8::1"


# -- ACL conditions at the data stage ----------------------------------------------------------------


def test_acl_conditions_match_the_verdicts_of_the_transaction():
    from pymta.config import AclRule
    from pymta.inbound.acl import AclPolicy

    policy = AclPolicy({"data": [
        AclRule(action="reject", reply=(550, "5.7.1", "DKIM signature fails"), dkim=("fail", "permerror")),
        AclRule(action="tempfail", spf=("temperror",), dmarc=("temperror",)),
    ]})  # fmt: skip
    session = Sess(transaction=Txn(sender="a@example.org"))
    assert policy.check("data", session) is None  # no verdicts (e.g. a trusted client): no match
    session.transaction.notes["auth"] = V.Verdicts(dkim="fail")
    assert policy.check("data", session).text == "DKIM signature fails"
    session.transaction.notes["auth"] = V.Verdicts(dkim="pass", spf="temperror", dmarc="temperror")
    assert policy.check("data", session).code == 450
    session.transaction.notes["auth"] = V.Verdicts(dkim="pass", spf="temperror", dmarc="pass")
    assert policy.check("data", session) is None


# -- bad input never raises ---------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_value = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b" "))
_record = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dkim_value=st.one_of(_value, _value.map(lambda v: b"v=1; a=rsa-sha256; d=example.org; s=s1; " + v)),
       arc_value=st.one_of(_value, _value.map(lambda v: b"i=1; cv=none; " + v)), ar_value=_value,
       spf=st.one_of(_record, _record.map(lambda r: "v=spf1 " + r)),
       dmarc=st.one_of(_record, _record.map(lambda r: "v=DMARC1; " + r)),
       key=st.one_of(_record, _record.map(lambda r: "v=DKIM1; k=rsa; p=" + r)))
def test_malformed_signatures_records_and_sets_give_verdicts_never_exceptions(dkim_value, arc_value, ar_value, spf,
                                                                             dmarc, key):  # fmt: skip
    msg = (b"DKIM-Signature: " + dkim_value + b"\r\nARC-Seal: " + arc_value + b"\r\nARC-Message-Signature: " + arc_value
           + b"\r\nAuthentication-Results: " + ar_value + b"\r\n" + message())  # fmt: skip
    d = dns(records={("example.org", "TXT"): [spf], ("_dmarc.example.org", "TXT"): [dmarc],
                     ("s1._domainkey.example.org", "TXT"): [key]})  # fmt: skip
    v = V.evaluate(msg, d, "192.0.2.9", "h.example", "a@example.org")
    assert {v.spf, v.helo_spf, v.dkim, v.dmarc, v.arc} <= set(V.RESULTS)
    assert all(r.result in V.RESULTS for r in v.dkim_results)
    field = V.authentication_results("mx.example.test", v)
    assert field.count(b"\r\n") == field.count(b";\r\n\t") + 1  # one field, folded only between results
    cleaned, _ = V.remove_forged(msg, "mx.example.test")
    assert cleaned.endswith(message())


def test_dmarc_quarantine_adds_a_header_or_reroutes_to_the_quarantine_mailbox():
    def session() -> Sess:
        txn = Txn(sender="x@elsewhere.example", recipients=[Accepted("alice@example.test"), Accepted("bob@example.test")])
        txn.notes["routes"] = {a: ("local", a) for a in ("alice@example.test", "bob@example.test")}
        return Sess(peer_address="203.0.113.5", helo_name="h.example", transaction=txn)

    msg = message("news@mail.example.org")  # sp=quarantine applies to the subdomain
    plain = SenderAuth(task.Clock(), None, "mx.example.test", verify=True, dns_factory=dns)
    s1 = session()
    body = plain.accept(s1, msg, trusted=False).result
    assert body.startswith(b"X-DMARC-Quarantine: p=quarantine of mail.example.org\r\nAuthentication-Results:")
    assert s1.transaction.notes["routes"]["bob@example.test"] == ("local", "bob@example.test")
    held = SenderAuth(task.Clock(), None, "mx.example.test", verify=True, dns_factory=dns,
                      dmarc_quarantine="quarantine@example.test")  # fmt: skip
    s2 = session()
    held.accept(s2, msg, trusted=False)
    assert set(s2.transaction.notes["routes"].values()) == {("local", "quarantine@example.test")}


def test_dkimpys_rsa_primitive_on_openssl_gives_the_same_signature():
    import hashlib

    from pymta.auth.dkim import _PURE_RSA_SIGN, openssl_rsa_sign

    pem = RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    private = dkim.crypto.parse_pem_private_key(pem)
    digest = hashlib.sha256(b"canonicalised header fields")
    assert openssl_rsa_sign(digest, private) == _PURE_RSA_SIGN(digest.copy(), private)
    sha1 = hashlib.sha1(b"x")
    assert openssl_rsa_sign(sha1, private) == _PURE_RSA_SIGN(sha1.copy(), private)  # falls back
