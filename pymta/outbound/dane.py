"""DANE for SMTP (RFC 7672): which MX hosts have usable TLSA records, and whether the certificate
chain a server presented matches them.

A host's TLSA records count only when the domain's MX answer, the host's address records and the
TLSA answer are all DNSSEC-validated (AD bit from the trusted resolver). Usable records are
DANE-TA(2) and DANE-EE(3), selectors Cert(0) and SPKI(1), matching types Full(0), SHA2-256(1) and
SHA2-512(2); PKIX usages 0 and 1 and unknown values are unusable (§3.1.3). A secure RRset without a
usable record still makes TLS mandatory, without authentication (§2.2, as Postfix's ``dane``). A TLSA
lookup that fails (SERVFAIL: a bogus answer behind a validating resolver) makes the host unusable
for now, never plaintext. DANE-EE ignores names and dates (§3.1.1); DANE-TA wants the chain up to
the matched authority, within its dates, for the MX host name (§3.1.2, §3.2.2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from pymta.dns import DNSError

log = Logger(namespace="pymta.outbound.dane")

USAGES = (2, 3)
SELECTORS = (0, 1)
MATCHING = (0, 1, 2)


@dataclass(frozen=True)
class DANEHost:
    """What DANE says of one MX host: ``records`` the usable TLSA records (empty: TLS mandatory but
    not authenticated), or ``failure`` (the lookup failed: do not use the host now)."""

    host: str
    records: tuple[tuple[int, int, int, bytes], ...] = ()
    unusable: int = 0  # records left out for unknown or unsuitable parameters
    failure: str | None = None


def usable(records: tuple[tuple[int, int, int, bytes], ...]) -> tuple[tuple[int, int, int, bytes], ...]:
    return tuple(r for r in records if r[0] in USAGES and r[1] in SELECTORS and r[2] in MATCHING)


class DANE:
    """TLSA lookups through a DNSSEC-aware resolver (:class:`pymta.dns.Resolver` with ``dnssec``)."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    @defer.inlineCallbacks
    def domain_secure(self, domain: str) -> Any:
        """Whether the MX answer of ``domain`` is DNSSEC-validated (else DANE does not apply, §2.2.1)."""
        try:
            mx = yield self.resolver.lookup_mx(domain)
        except DNSError:
            return False
        return bool(mx.secure)

    @defer.inlineCallbacks
    def host(self, host: str, port: int = 25) -> Any:
        """The :class:`DANEHost` of an MX host, or None when DANE does not apply to it."""
        try:
            if not (yield self.resolver.addresses_secure(host)):
                return None  # §2.2.2: insecure address records, no TLSA lookup
            answer = yield self.resolver.lookup_tlsa(host, port)
        except DNSError as e:
            log.warn("TLSA lookup for {mx} failed: {why}; the host is not used now", mx=host, why=str(e),
                     event="dane_tlsa_failed")  # fmt: skip
            return DANEHost(host, failure=f"TLSA lookup of _{port}._tcp.{host} failed (DNSSEC): {e}")
        if not answer.secure or not answer.records:
            return None
        good = usable(answer.records)
        left = len(answer.records) - len(good)
        if left:
            log.warn("{mx}: {n} TLSA record(s) with unusable parameters ignored{rest}", mx=host, n=left,
                     rest="" if good else "; none usable: TLS is mandatory, unauthenticated", event="dane_tlsa_unusable")  # fmt: skip
        return DANEHost(host, good, left)


@implementer(IOpenSSLClientConnectionCreator)
class WithSNI:
    """A client TLS context that sends the TLSA base domain as SNI (RFC 7672 §8.1); the chain is
    checked against the TLSA records afterwards (:func:`check_chain`), not by PKIX."""

    def __init__(self, options: Any, hostname: str) -> None:
        self.options = options
        self.hostname = hostname.encode("ascii")

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_app_data(tls_protocol)
        connection.set_tlsext_host_name(self.hostname)
        connection.set_connect_state()
        return connection


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _selected(cert: Any, selector: int) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if selector == 0:
        return cast(bytes, cert.public_bytes(serialization.Encoding.DER))
    return cast(bytes, cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _matches(cert: Any, record: tuple[int, int, int, bytes]) -> bool:
    _, selector, mtype, data = record
    return _digest(_selected(cert, selector), mtype) == data


def check_chain(transport: Any, dane_host: DANEHost, names: tuple[str, ...]) -> str | None:
    """None when the TLS session on ``transport`` matches one of the host's TLSA records, else an
    RFC 8460 result type with the reason (``validation-failure: ...``). ``names``: the reference
    identifiers for DANE-TA (the MX host name)."""
    from OpenSSL import crypto

    if not dane_host.records:
        return None  # TLS mandatory, no authentication possible
    conn = getattr(transport, "getHandle", lambda: None)()
    chain = (conn.get_peer_cert_chain() if conn is not None and hasattr(conn, "get_peer_cert_chain") else None) or []
    if not chain:
        return "validation-failure: no certificate presented"
    certs = [c.to_cryptography() for c in chain]
    leaf = certs[0]
    problem = "validation-failure: the certificate matches no TLSA record"
    for record in dane_host.records:
        if record[0] == 3:
            if _matches(leaf, record):
                return None
            continue
        for i, ta in enumerate(certs[1:], 1):
            if not _matches(ta, record):
                continue
            store = crypto.X509Store()
            store.add_cert(chain[i])
            store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
            try:
                crypto.X509StoreContext(store, chain[0], chain[1:i]).verify_certificate()
            except crypto.X509StoreContextError as e:
                expired = bool(e.errors) and e.errors[0] == 10
                problem = ("certificate-expired: " if expired else "validation-failure: ") + \
                    f"the chain does not verify up to the TLSA trust anchor ({e})"  # fmt: skip
                continue
            if _name_matches(leaf, names):
                return None
            problem = f"certificate-host-mismatch: the certificate is not for {' or '.join(names)}"
    return problem


def _name_matches(cert: Any, names: tuple[str, ...]) -> bool:
    from service_identity import VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    for name in names:
        try:
            verify_certificate_hostname(cert, name)
            return True
        except (VerificationError, ValueError):
            continue
        except Exception:  # a certificate service_identity cannot read names nothing
            return False
    return False
