"""Sender authentication at the end of DATA, before the message is queued.

Mail from trusted clients (relay networks, authenticated users) is DKIM-signed once, here: the
signature is written into the queued body, so retries send the same bytes and never re-sign.
Other mail gets SPF/DKIM/DMARC/ARC verdicts (kept in the transaction's notes for the data-stage
ACL), forged Authentication-Results of our authserv-id removed, ours added, DMARC ``p=reject``
honoured when configured, and an ARC set when it is forwarded. The blocking work (signatures,
DNS through pymta's resolver) runs in a thread pool of its own, never on the reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from pymta.auth import verdicts as V
from pymta.auth.dkim import DkimSigner, use_fast_body_canonicalisation_in_dkimpy, use_openssl_in_dkimpy
from pymta.envelope import ROUTE_FORWARD, ROUTE_LOCAL
from pymta.smtp.replies import Reply

log = Logger(namespace="pymta.auth")

QUARANTINE_HEADER = b"X-DMARC-Quarantine"


class SenderAuth:
    """The receiver's hook: ``accept(session, body, trusted)`` -> Deferred of the body to queue or a Reply."""

    def __init__(
        self,
        reactor: Any,
        threadpool: Any,
        authserv_id: str,
        signer: DkimSigner | None = None,
        resolver: Any = None,
        verify: bool = False,
        dmarc_reject: bool = False,
        dmarc_quarantine: str | None = None,
        arc_seal: bool = True,
        dns_budget: float = 30.0,
        dns_factory: Any = None,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.authserv_id = authserv_id
        self.signer = signer if signer else None
        self.verify = verify and (resolver is not None or dns_factory is not None)
        self.dmarc_reject = dmarc_reject
        self.dmarc_quarantine = dmarc_quarantine
        self.arc_seal = arc_seal
        if arc_seal and self.signer is not None:
            use_openssl_in_dkimpy()  # dkimpy signs ARC sets; its pure-Python RSA costs ~12 ms a signature
        if self.verify or (arc_seal and self.signer is not None):
            use_fast_body_canonicalisation_in_dkimpy()  # dkimpy's regex: 1.4 ms for 50 KB of text, quadratic in a WSP run
        self.stopped = False
        self.dns_factory = dns_factory or (lambda: V.ResolverDNS(reactor, resolver, dns_budget, lambda: self.stopped))

    def stop(self) -> None:
        """Lookups in flight give up (temperror), so the thread pool can be joined at shutdown."""
        self.stopped = True

    def _run(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        if self.threadpool is None:
            return defer.maybeDeferred(function, *args)
        return threads.deferToThreadPool(self.reactor, self.threadpool, function, *args)

    def sign(self, body: bytes, user: str | None = None, client: str = "") -> defer.Deferred[Any]:
        """``body`` DKIM-signed (in the pool; unchanged when no key applies or signing fails)."""
        if self.signer is None:
            return defer.succeed(body)
        d = self._run(self.signer.sign, body, user)
        return d.addErrback(self._unsigned, client, body)

    def accept(self, session: Any, body: bytes, trusted: bool) -> defer.Deferred[Any]:
        if trusted:
            return self.sign(body, session.auth_user, session.peer_address or "")
        if not self.verify:
            return defer.succeed(body)
        txn = session.transaction
        routes = txn.notes.get("routes", {})
        forwards = [address for route, address in routes.values() if route == ROUTE_FORWARD]
        d = self._run(self.inbound, body, session.peer_address or "", session.helo_name or "", txn.sender or "", forwards)
        d.addCallback(self._decide, session)
        d.addErrback(self._unverified, session, body)
        return d

    # -- in the thread pool -----------------------------------------------------------------

    def inbound(self, body: bytes, client: str, helo: str, sender: str, forwards: list[str]) -> tuple[Any, bytes]:
        verdicts = V.evaluate(body, self.dns_factory(), client, helo, sender)
        body, removed = V.remove_forged(body, self.authserv_id)
        if removed:
            log.info("removed {count} forged Authentication-Results", event="auth_forged_removed", count=removed)
        header = V.authentication_results(self.authserv_id, verdicts)
        seal = self.seal(header + body, forwards, verdicts) if forwards and self.arc_seal else b""
        return verdicts, seal + header + body

    def seal(self, message: bytes, forwards: list[str], verdicts: V.Verdicts) -> bytes:
        """An ARC set (RFC 8617) by the forwarding domain's RSA key, or nothing without one."""
        if self.signer is None or verdicts.arc not in ("pass", "fail", "none"):
            return b""  # no key, or no chain validation status to seal (RFC 8617 cv=)
        import dkim

        domain = forwards[0].rpartition("@")[2].lower()
        keys = [k for k in self.signer.keys_for(domain) if k.algorithm == "rsa-sha256"]
        if not keys:
            log.info("not ARC-sealed: no RSA [dkim] key for {domain}", event="arc_unsealed", domain=domain)
            return b""
        key = keys[0]
        try:
            arc = dkim.ARC(message, minkey=1024)
            lines = arc.sign(key.selector.encode(), key.domain.encode(), key.pem(), self.authserv_id.encode(),
                             timestamp=int(self.reactor.seconds()))  # fmt: skip
        except Exception as e:  # dkimpy on a header block it cannot take
            log.warn("not ARC-sealed: {why}", event="arc_unsealed", domain=domain, why=str(e)[:200])
            return b""
        return b"".join(line if line.endswith(b"\r\n") else line + b"\r\n" for line in lines)

    # -- back on the reactor ----------------------------------------------------------------

    def _decide(self, result: tuple[V.Verdicts, bytes], session: Any) -> bytes | Reply:
        verdicts, body = result
        txn = session.transaction
        txn.notes["auth"] = verdicts
        log.info(
            "verdicts for <{sender}> from {client}: spf={spf} dkim={dkim} dmarc={dmarc} arc={arc}",
            event="auth_verdicts", client=session.peer_address, sender=txn.sender, spf=verdicts.spf,
            dkim=verdicts.dkim, dmarc=verdicts.dmarc, dmarc_policy=verdicts.dmarc_policy,
            header_from=verdicts.header_from, arc=verdicts.arc,
        )  # fmt: skip
        if verdicts.dmarc != "fail":
            return body
        if verdicts.dmarc_policy == "reject" and self.dmarc_reject:
            reply = Reply(550, "5.7.1", f"Message rejected by the DMARC policy of {verdicts.header_from}")
            log.info("rejected by DMARC: {code} {enhanced} {text}", event="reject", stage="data",
                     client=session.peer_address, sender=txn.sender, code=reply.code, enhanced=reply.enhanced,
                     text=reply.text)  # fmt: skip
            return reply
        if verdicts.dmarc_policy in ("quarantine", "reject"):
            if self.dmarc_quarantine:
                routes = txn.notes.setdefault("routes", {})
                for address in list(routes):
                    routes[address] = (ROUTE_LOCAL, self.dmarc_quarantine)
            body = QUARANTINE_HEADER + f": p={verdicts.dmarc_policy} of {verdicts.header_from}\r\n".encode() + body
        return body

    def _unverified(self, failure: Any, session: Any, body: bytes) -> bytes:
        """Never lose a message to a verdict bug: it is queued without verdicts, and logged."""
        log.failure("verdicts failed for mail from {client}", failure, client=session.peer_address)
        return body

    def _unsigned(self, failure: Any, client: str, body: bytes) -> bytes:
        log.failure("DKIM signing failed for mail from {client}", failure, client=client)
        return body


VERDICT_CONDITIONS = ("spf", "dkim", "dmarc", "arc")


def sender_auth_from_config(config: Any, reactor: Any, resolver: Any) -> SenderAuth | None:
    """The hook for ``[auth]`` and ``[dkim.*]`` (None when neither asks for anything).

    Raises :class:`pymta.auth.dkim.DkimKeyError` (one line naming the file) for an unusable key.
    Its thread pool (``.threadpool``) is the caller's to start and stop: it is not the resolver's
    pool, so lookups made from it can never wait for a thread it holds.
    """
    from twisted.python.threadpool import ThreadPool

    auth = config.auth
    acl_needs = any(getattr(r, c, None) is not None for rules in config.acl.values() for r in rules
                    for c in VERDICT_CONDITIONS)  # fmt: skip
    verify = auth.verify or auth.dmarc_reject or acl_needs
    signer = DkimSigner(config.dkim, config.path, reactor) if config.dkim else None
    if signer is None and not verify:
        return None
    pool = ThreadPool(minthreads=0, maxthreads=4, name="pymta-auth")
    return SenderAuth(reactor, pool, auth.authserv_id or config.hostname, signer=signer, resolver=resolver,
                      verify=verify, dmarc_reject=auth.dmarc_reject, dmarc_quarantine=auth.dmarc_quarantine,
                      arc_seal=auth.arc_seal, dns_budget=max(10.0, config.dns.timeout * 6))  # fmt: skip
