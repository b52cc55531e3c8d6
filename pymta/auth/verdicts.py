"""SPF, DKIM, DMARC and ARC verdicts on inbound mail, and the Authentication-Results field (RFC 8601).

Libraries: pyspf (RFC 7208, with its lookup limits) for SPF, dkimpy for DKIM signatures and ARC
chains, publicsuffixlist (its bundled Public Suffix List; never fetched) for the organisational
domain of DMARC (RFC 7489, implemented here: record discovery, alignment, policy). All DNS goes
through a :class:`SyncDNS` (in the MTA: pymta's resolver, see :class:`ResolverDNS`); a temporary
DNS failure gives ``temperror``, malformed records or signatures ``permerror``/``fail``, never an
exception.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, cast

import dkim
import spf
from publicsuffixlist import PublicSuffixList
from twisted.logger import Logger

from pymta.auth.dkim import ParsedDKIM, from_domain, header_block

log = Logger(namespace="pymta.auth.verdicts")

MAX_HEADER = 256 * 1024  # octets of header block searched for fields to remove
MAX_SIGNATURES = 8  # DKIM signatures verified per message (more are reported as not checked)
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy")
_PSL: PublicSuffixList | None = None


def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2) from the bundled Public Suffix List."""
    global _PSL
    if _PSL is None:
        _PSL = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return _PSL.privatesuffix(domain) or domain


class TempDNSError(Exception):
    """A lookup failed for now (SERVFAIL, timeout, the time budget spent)."""


class SyncDNS:
    """Blocking lookups for the verdict code (runs in a worker thread). Empty list: no such data.

    Subclasses implement :meth:`query`; ``rdtype`` is TXT, A, AAAA, MX (``"pref host"``) or PTR.
    """

    def query(self, name: str, rdtype: str) -> list[str]:
        raise NotImplementedError

    def txt(self, name: str) -> list[str]:
        return self.query(name, "TXT")


class ResolverDNS(SyncDNS):
    """pymta's :class:`pymta.interfaces.IResolver` from a worker thread, within a time budget.

    Each lookup is started on the reactor and waited for in short slices, so that a stopping
    service (``stopped()`` true) or the spent budget ends the wait: a worker thread never blocks
    the shutdown that joins it.
    """

    def __init__(self, reactor: Any, resolver: Any, budget: float = 30.0, stopped: Any = None) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.deadline = reactor.seconds() + budget
        self.stopped = stopped or (lambda: False)

    def _call(self, function: Any, *args: Any) -> Any:
        import threading

        from twisted.internet import defer

        done = threading.Event()
        box: list[Any] = []

        def settle(result: Any) -> None:
            box.append(result)
            done.set()

        def start() -> None:
            d = defer.maybeDeferred(function, *args)
            d.addBoth(settle)

        self.reactor.callFromThread(start)
        while not done.wait(0.1):
            if self.stopped() or self.reactor.seconds() > self.deadline:
                raise TempDNSError("DNS time budget spent" if not self.stopped() else "shutting down")
        result = box[0]
        if hasattr(result, "raiseException"):  # a Failure
            result.raiseException()
        return result

    def query(self, name: str, rdtype: str) -> list[str]:
        from pymta.dns import DNSPermanentError

        if self.stopped() or self.reactor.seconds() > self.deadline:
            raise TempDNSError("DNS time budget spent")
        try:
            if rdtype == "TXT":
                return list(self._call(self.resolver.lookup_txt, name))
            if rdtype == "PTR":
                return list(self._call(self.resolver.lookup_ptr, name))
            if rdtype == "MX":
                result = self._call(self.resolver.lookup_mx, name)
                if result.implicit or result.null:
                    return []
                return [f"{p} {h}" for p, h in zip(result.preferences, result.hosts, strict=False)]
            addresses = self._call(self.resolver.lookup_addresses, name)
            version = 6 if rdtype == "AAAA" else 4
            return [a for a in addresses if ipaddress.ip_address(a).version == version]
        except DNSPermanentError:
            return []  # NXDOMAIN: no such data
        except TempDNSError:
            raise
        except Exception as e:  # temporary failures, malformed answers
            raise TempDNSError(str(e)) from None


@dataclass
class DkimResult:
    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""  # the first characters of b= (RFC 6008 header.b)
    reason: str = ""


@dataclass
class Verdicts:
    spf: str = "none"
    spf_domain: str = ""  # the MAIL FROM domain checked (or the HELO name for a null sender)
    helo_spf: str = "none"
    helo: str = ""
    mail_from: str = ""
    dkim: str = "none"
    dkim_results: list[DkimResult] = field(default_factory=list)
    dmarc: str = "none"
    dmarc_policy: str = ""  # the policy that applies: none, quarantine, reject
    header_from: str = ""
    arc: str = "none"
    arc_reason: str = ""

    def value(self, method: str) -> str:
        return cast(str, getattr(self, method))


# -- SPF ------------------------------------------------------------------------------------


class _SPFQuery(spf.query):  # type: ignore[misc]  # pyspf has no type information
    """pyspf's evaluation (limits, macros, void lookups) with its DNS through a :class:`SyncDNS`."""

    def __init__(self, dns: SyncDNS, *args: Any, **kwargs: Any) -> None:
        self._sync_dns = dns
        super().__init__(*args, **kwargs)

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self.cache:
            if qtype == "PTR":
                records: list[Any] = self._sync_dns.query(_ptr_address(name), "PTR")
            elif qtype == "MX":
                records = []
                for text in self._sync_dns.query(name, "MX"):
                    pref, _, host = text.partition(" ")
                    records.append((int(pref), host))
            elif qtype in ("TXT", "SPF"):
                records = [(t.encode("utf-8"),) for t in self._sync_dns.query(name, "TXT")] if qtype == "TXT" else []
            else:
                records = self._sync_dns.query(name, qtype)
            self.cache[key] = records
        result = self.cache[key]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)


def _ptr_address(name: str) -> str:
    labels = name.split(".")
    if name.endswith(".in-addr.arpa"):
        return ".".join(reversed(labels[:-2]))
    nibbles = "".join(reversed(labels[:-2]))
    return str(ipaddress.ip_address(":".join(nibbles[i : i + 4] for i in range(0, 32, 4))))


def check_spf(dns: SyncDNS, client_ip: str, sender: str, helo: str) -> tuple[str, str]:
    """(result, explanation) for ``sender`` (``postmaster@helo`` when the sender is null)."""
    identity = sender or f"postmaster@{helo}"
    try:
        query = _SPFQuery(dns, i=client_ip, s=identity, h=helo or "unknown", timeout=20, querytime=0)
        result, _, explanation = query.check()
    except TempDNSError as e:
        return "temperror", str(e)
    except Exception as e:  # pyspf on input it cannot take (e.g. a malformed address)
        return "permerror", f"{type(e).__name__}: {e}"
    if result == "temperror" or result not in RESULTS:
        return ("temperror" if result == "temperror" else "permerror"), str(explanation)
    return result, str(explanation)


# -- DKIM -----------------------------------------------------------------------------------


class _KeyLookups:
    """dkimpy's ``dnsfunc``: TXT through our DNS; remembers what each key record looked like."""

    def __init__(self, dns: SyncDNS) -> None:
        self.dns = dns
        self.state: dict[str, str] = {}

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).rstrip(".")
        records = self.dns.txt(text)
        if not records:
            self.state[text] = "missing"
            return None
        record = records[0]
        if re.search(r"(?:^|;)\s*p\s*=\s*(?:;|$)", record):
            self.state[text] = "revoked"
        return record.encode("utf-8", "replace")


def _sig_tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return cast("dict[bytes, bytes]", dkim.util.parse_tag_value(value))
    except Exception:
        return {}


def check_dkim(message: bytes, dns: SyncDNS, header_name: bytes = b"dkim-signature") -> list[DkimResult]:
    """One result per DKIM-Signature (top first, at most :data:`MAX_SIGNATURES`)."""
    try:
        verifier = ParsedDKIM(message, minkey=1024)
    except Exception as e:  # a header block dkimpy cannot parse
        signed = header_name in header_block(message).lower()
        return [DkimResult("permerror", reason=f"unparsable message: {str(e)[:100]}")] if signed else []
    signatures = [v for k, v in verifier.headers if k.lower() == header_name]
    lookups = _KeyLookups(dns)
    results = []
    for idx, raw in enumerate(signatures[:MAX_SIGNATURES]):
        tags = _sig_tags(raw)
        out = DkimResult(
            "fail",
            domain=tags.get(b"d", b"").decode("ascii", "replace").lower(),
            selector=tags.get(b"s", b"").decode("ascii", "replace"),
            algorithm=tags.get(b"a", b"").decode("ascii", "replace"),
            b=re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace"),
        )
        key_name = f"{out.selector}._domainkey.{out.domain}"
        try:
            verifier = ParsedDKIM(message, minkey=1024)
            prep = verifier.verify_headerprep(idx)
            if not prep:
                out.result, out.reason = "permerror", "signature not found"
            else:
                sig, include, headers = prep
                ok = verifier.verify_sig(sig, include, headers[idx], lookups)
                state = lookups.state.get(key_name)
                if ok:
                    out.result = "pass"
                    length = sig.get(b"l")
                    if length is not None:
                        policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
                        if int(length) < len(policy.canonicalize_body(verifier.body)):
                            out.result, out.reason = "policy", "l= leaves part of the body unsigned"
                elif state == "missing":
                    out.result, out.reason = "permerror", "no key"
                elif state == "revoked":
                    out.result, out.reason = "fail", "key revoked"
                else:
                    out.result, out.reason = "fail", "bad signature"
        except TempDNSError as e:
            out.result, out.reason = "temperror", str(e)
        except dkim.ValidationError as e:
            text = str(e)
            out.result = "fail" if "body hash" in text or "expired" in text else "permerror"
            out.reason = text[:100]
        except Exception as e:  # malformed tags, unknown algorithms, dkimpy surprises
            out.result, out.reason = "permerror", f"{type(e).__name__}: {str(e)[:100]}"
        results.append(out)
    return results



def summarise_dkim(results: list[DkimResult]) -> str:
    kinds = {r.result for r in results}
    for result in ("pass", "temperror", "fail", "policy", "permerror"):
        if result in kinds:
            return "fail" if result == "policy" else result
    return "none"


# -- ARC ------------------------------------------------------------------------------------


def check_arc(message: bytes, dns: SyncDNS) -> tuple[str, str]:
    """(chain validation status, reason): pass, fail, none, temperror, permerror."""
    if b"arc-seal" not in header_block(message).lower():
        return "none", ""
    try:
        cv, _, reason = dkim.ARC(message, minkey=1024).verify(dnsfunc=_KeyLookups(dns))
    except TempDNSError as e:
        return "temperror", str(e)
    except Exception as e:
        return "fail", f"{type(e).__name__}: {str(e)[:100]}"
    status = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
    return (status if status in ("pass", "fail", "none") else "fail"), str(reason or "")[:100]


# -- DMARC ----------------------------------------------------------------------------------

_DMARC_TAG = re.compile(r"^\s*([a-z]+)\s*=\s*(.*?)\s*$", re.I)


def parse_dmarc(record: str) -> dict[str, str] | None:
    """The tags of a DMARC record, or None when it is malformed."""
    tags: dict[str, str] = {}
    parts = [p for p in record.split(";") if p.strip()]
    for i, part in enumerate(parts[:64]):
        m = _DMARC_TAG.match(part)
        if m is None:
            return None
        name, value = m.group(1).lower(), m.group(2)
        if i == 0 and (name != "v" or value != "DMARC1"):
            return None
        tags.setdefault(name, value)
    if tags.get("p", "").lower() not in ("none", "quarantine", "reject"):
        return None
    if tags.get("sp", "none").lower() not in ("none", "quarantine", "reject"):
        return None
    for key in ("adkim", "aspf"):
        if tags.get(key, "r").lower() not in ("r", "s"):
            return None
    return tags


def find_dmarc(dns: SyncDNS, domain: str) -> tuple[str, dict[str, str] | None, str]:
    """("found" | "none" | "temperror" | "permerror", tags, the domain whose record applies)."""
    org = organizational_domain(domain)
    for candidate in dict.fromkeys((domain, org)):
        try:
            records = [r for r in dns.txt(f"_dmarc.{candidate}") if r.lstrip().lower().startswith("v=dmarc1")]
        except TempDNSError:
            return "temperror", None, candidate
        if len(records) > 1:
            return "permerror", None, candidate  # more than one record: none applies (§6.6.3)
        if records:
            tags = parse_dmarc(records[0])
            return ("found", tags, candidate) if tags is not None else ("permerror", None, candidate)
    return "none", None, domain


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def check_dmarc(dns: SyncDNS, verdicts: Verdicts, header_from: str | None) -> tuple[str, str]:
    """(result, policy that applies) for the From domain given the SPF and DKIM verdicts."""
    if not header_from:
        return "permerror", ""  # no single From address: DMARC cannot be evaluated
    status, tags, where = find_dmarc(dns, header_from)
    if status != "found" or tags is None:
        return status, ""
    policy = tags["p"].lower()
    if where != header_from and "sp" in tags:
        policy = tags["sp"].lower()
    spf_ok = verdicts.spf == "pass" and aligned(verdicts.spf_domain, header_from, tags.get("aspf", "r").lower())
    dkim_ok = any(
        r.result == "pass" and aligned(r.domain, header_from, tags.get("adkim", "r").lower())
        for r in verdicts.dkim_results
    )
    if spf_ok or dkim_ok:
        return "pass", policy
    if verdicts.spf == "temperror" or verdicts.dkim == "temperror":
        return "temperror", policy
    return "fail", policy


# -- all of it --------------------------------------------------------------------------------


def evaluate(message: bytes, dns: SyncDNS, client_ip: str, helo: str, sender: str) -> Verdicts:
    """Every verdict for one inbound message (blocking: run it in a worker thread)."""
    v = Verdicts(helo=helo, mail_from=sender)
    v.spf_domain = sender.rpartition("@")[2].lower() if sender else helo.lower()
    v.spf, _ = check_spf(dns, client_ip, sender, helo)
    if sender:
        v.helo_spf, _ = check_spf(dns, client_ip, "", helo) if helo else ("none", "")
    else:
        v.helo_spf = v.spf
    v.dkim_results = check_dkim(message, dns)
    v.dkim = summarise_dkim(v.dkim_results)
    v.arc, v.arc_reason = check_arc(message, dns)
    v.header_from = from_domain(message) or ""
    v.dmarc, v.dmarc_policy = check_dmarc(dns, v, v.header_from)
    return v


# -- the header field ---------------------------------------------------------------------------


def _ptext(value: str) -> str:
    """A property value safe in the header (RFC 8601 ``pvalue``: quoted when not a token)."""
    value = "".join(c for c in value if " " < c < "\x7f" and c not in '"\\')[:255]
    return value if re.fullmatch(r"[A-Za-z0-9._@+-]+", value or "-") else f'"{value}"'


def authentication_results(authserv_id: str, v: Verdicts) -> bytes:
    """``Authentication-Results:`` (RFC 8601) for ``v``, folded, ending in CRLF."""
    parts = [f"spf={v.spf} smtp.mailfrom={_ptext(v.mail_from or v.spf_domain)}"]
    if v.helo:
        parts.append(f"spf={v.helo_spf} smtp.helo={_ptext(v.helo)}")
    if not v.dkim_results:
        parts.append("dkim=none")
    for r in v.dkim_results:
        reason = f' reason="{_plain(r.reason)}"' if r.reason and r.result != "pass" else ""
        parts.append(f"dkim={r.result}{reason} header.d={_ptext(r.domain or 'unknown')} header.s={_ptext(r.selector or 'unknown')}"
                     f" header.a={_ptext(r.algorithm or 'unknown')} header.b={_ptext(r.b or 'none')}")  # fmt: skip
    parts.append(f"dmarc={v.dmarc}" + (f" policy.dmarc={v.dmarc_policy}" if v.dmarc_policy else "")
                 + f" header.from={_ptext(v.header_from or 'unknown')}")  # fmt: skip
    parts.append(f"arc={v.arc}")
    return ("Authentication-Results: " + _ptext(authserv_id) + ";\r\n\t" + ";\r\n\t".join(parts) + "\r\n").encode()


def _plain(text: str) -> str:
    return "".join(c for c in text if " " <= c < "\x7f" and c not in '"\\')[:100]


_AR_FIELD = re.compile(rb"^Authentication-Results[ \t]*:(.*(?:\r\n[ \t].*)*)\r\n", re.I | re.M)


def authserv_id_of(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    text = re.sub(r"\([^()]*\)", " ", text)  # comments
    return text.split(";", 1)[0].strip().split()[0].lower() if text.split(";", 1)[0].strip() else ""


def remove_forged(message: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``message`` without Authentication-Results fields that claim to be ours (RFC 8601 §5)."""
    end = message.find(b"\r\n\r\n", 0, MAX_HEADER)
    if end < 0:
        return message, 0
    head, rest = message[: end + 2], message[end + 2 :]
    ours = authserv_id.lower()
    removed = 0

    def drop(m: re.Match[bytes]) -> bytes:
        nonlocal removed
        if authserv_id_of(m.group(1)) == ours:
            removed += 1
            return b""
        return m.group(0)

    head = _AR_FIELD.sub(drop, head)
    return head + rest, removed


_METHOD = re.compile(rb"(?:^|;)\s*dkim\s*=\s*([a-z]+)", re.I)


def recorded_dkim(message: bytes, authserv_id: str) -> str | None:
    """The DKIM verdict our own Authentication-Results field records (pass wins), else None."""
    found = None
    for m in _AR_FIELD.finditer(header_block(message)):
        if authserv_id_of(m.group(1)) != authserv_id.lower():
            continue
        results = {r.decode().lower() for r in _METHOD.findall(m.group(1).replace(b"\r\n", b" "))}
        found = summarise_dkim([DkimResult(r) for r in results]) if results else "none"
    return found
