"""``pymta-check DOMAIN``: a sending domain's DNS against this configuration, one line per check.

Checks: SPF authorises every configured source address (``[sources]``, ``[outbound]
source_address``) for the domain and the return-path domain within the lookup limits; each DKIM
selector's published key is this configuration's; a DMARC record exists and the return path and
the DKIM d= align with it; each source address has a PTR that resolves back to it and equals its
EHLO name; MTA-STS and TLS-RPT records (warnings only). ``--json`` prints the same as JSON. The exit
status is 1 when a required check fails. DNS goes through pymta's resolver (``[dns] servers``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from pymta.auth import verdicts as V

OK, FAIL, WARN = "ok", "fail", "warn"


@dataclass
class Check:
    status: str
    check: str
    detail: str
    publish: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.check}: {self.detail}"
        return text + (f"; publish {self.publish}" if self.publish else "")


def source_addresses(config: Any) -> list[tuple[str, str]]:
    """(address, EHLO name) of every configured source."""
    out = [(s.address, s.ehlo or config.hostname) for s in config.sources.values()]
    if config.outbound.source_address:
        out.append((config.outbound.source_address, config.hostname))
    return list(dict.fromkeys(out))


def check_spf(dns: V.SyncDNS, domain: str, sources: list[tuple[str, str]], hostname: str) -> list[Check]:
    try:
        records = [r for r in dns.txt(domain) if r.lower().startswith("v=spf1")]
    except V.TempDNSError as e:
        return [Check(FAIL, f"spf {domain}", f"DNS failure: {e}")]
    suggestion = "TXT \"v=spf1 " + " ".join(
        f"ip{ipaddress.ip_address(a).version}:{a}" for a, _ in sources) + " -all\""  # fmt: skip
    if not records:
        return [Check(FAIL, f"spf {domain}", "no SPF record", suggestion if sources else "")]
    if len(records) > 1:
        return [Check(FAIL, f"spf {domain}", f"{len(records)} SPF records (permerror)", "one record")]
    if not sources:
        return [Check(WARN, f"spf {domain}", "no source address configured ([sources], [outbound] source_address)")]
    out = []
    for address, _ in sources:
        result, why = V.check_spf(dns, address, f"postmaster@{domain}", hostname)
        if result == "pass":
            out.append(Check(OK, f"spf {domain}", f"{address} is authorised"))
        else:
            detail = f"{address} gives {result}" + (f" ({why})" if why and result == "permerror" else "")
            out.append(Check(FAIL, f"spf {domain}", detail, suggestion))
    return out


def check_dkim(dns: V.SyncDNS, domain: str, keys: list[Any]) -> list[Check]:
    if not keys:
        return [Check(FAIL, f"dkim {domain}", "no [dkim] key signs for this domain (nor [dkim.default])")]
    out = []
    for key in keys:
        name = f"{key.selector}._domainkey.{key.domain}"
        wanted = key.public_record()
        try:
            records = [r for r in dns.txt(name) if "p=" in r]
        except V.TempDNSError as e:
            out.append(Check(FAIL, f"dkim {name}", f"DNS failure: {e}"))
            continue
        ours = _p_tag(wanted)
        if not records:
            out.append(Check(FAIL, f"dkim {name}", "not published", f'TXT "{wanted}"'))
        elif any(_p_tag(r) == ours for r in records):
            out.append(Check(OK, f"dkim {name}", f"published key matches {key.path} ({key.algorithm})"))
        else:
            out.append(Check(FAIL, f"dkim {name}", f"published key is not the one in {key.path}", f'TXT "{wanted}"'))
    return out


def _p_tag(record: str) -> str:
    for part in record.split(";"):
        tag, _, value = part.strip().partition("=")
        if tag.strip() == "p":
            return "".join(value.split())
    return ""


def check_dmarc(dns: V.SyncDNS, domain: str, return_domain: str, keys: list[Any]) -> list[Check]:
    status, tags, where = V.find_dmarc(dns, domain)
    if status == "none":
        return [Check(FAIL, f"dmarc {domain}", "no DMARC record",
                      f'TXT at _dmarc.{domain} "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"')]  # fmt: skip
    if status != "found" or tags is None:
        return [Check(FAIL, f"dmarc {domain}", f"record at _dmarc.{where}: {status}")]
    out = [Check(OK, f"dmarc {domain}", f"p={tags['p']} at _dmarc.{where}")]
    aspf, adkim = tags.get("aspf", "r").lower(), tags.get("adkim", "r").lower()
    if V.aligned(return_domain, domain, aspf):
        out.append(Check(OK, f"dmarc {domain}", f"return path {return_domain} aligns (aspf={aspf})"))
    else:
        out.append(Check(WARN, f"dmarc {domain}", f"return path {return_domain} does not align (aspf={aspf}): "
                                                  "SPF cannot give a DMARC pass, DKIM must"))  # fmt: skip
    d_domains = sorted({k.domain for k in keys})
    if any(V.aligned(d, domain, adkim) for d in d_domains):
        out.append(Check(OK, f"dmarc {domain}", f"DKIM d={','.join(d_domains)} aligns (adkim={adkim})"))
    else:
        out.append(Check(FAIL, f"dmarc {domain}", f"DKIM d={','.join(d_domains) or '(none)'} does not align "
                                                  f"(adkim={adkim})", f'a [dkim."{domain}"] key'))  # fmt: skip
    return out


def check_ptr(dns: V.SyncDNS, sources: list[tuple[str, str]]) -> list[Check]:
    out = []
    for address, ehlo in sources:
        try:
            names = dns.query(address, "PTR")
            confirmed = [n for n in names[:5] if address in dns.query(n, "AAAA" if ":" in address else "A")]
        except V.TempDNSError as e:
            out.append(Check(FAIL, f"ptr {address}", f"DNS failure: {e}"))
            continue
        if not names:
            out.append(Check(FAIL, f"ptr {address}", "no PTR record", f"PTR {ehlo}. for {address}"))
        elif not confirmed:
            out.append(Check(FAIL, f"ptr {address}", f"PTR {names[0]} does not resolve back to it",
                             f"A/AAAA {address} for {names[0]}"))  # fmt: skip
        elif ehlo.lower() not in confirmed:
            out.append(Check(FAIL, f"ptr {address}", f"PTR {confirmed[0]} is not the EHLO name {ehlo}",
                             f"PTR {ehlo}. (or ehlo = \"{confirmed[0]}\")"))  # fmt: skip
        else:
            out.append(Check(OK, f"ptr {address}", f"{ehlo} (forward-confirmed, equals EHLO)"))
    return out


def check_receiving(dns: V.SyncDNS, domain: str) -> list[Check]:
    out = []
    for name, prefix, check, publish in (
        (f"_mta-sts.{domain}", "v=stsv1", "mta-sts", f'TXT at _mta-sts.{domain} "v=STSv1; id=1" and the policy file'),
        (f"_smtp._tls.{domain}", "v=tlsrptv1", "tls-rpt",
         f'TXT at _smtp._tls.{domain} "v=TLSRPTv1; rua=mailto:tls-reports@{domain}"'),
    ):  # fmt: skip
        try:
            found = any(r.lower().replace(" ", "").startswith(prefix) for r in dns.txt(name))
        except V.TempDNSError as e:
            out.append(Check(WARN, f"{check} {domain}", f"DNS failure: {e}"))
            continue
        out.append(Check(OK, f"{check} {domain}", "published") if found else
                   Check(WARN, f"{check} {domain}", "not published", publish))  # fmt: skip
    return out


def run_checks(config: Any, domain: str, dns: V.SyncDNS, signer: Any) -> list[Check]:
    domain = domain.lower().rstrip(".")
    sources = source_addresses(config)
    return_domain = config.feedback.bounce_domain or domain
    keys = signer.keys_for(domain) if signer is not None else []
    checks = check_spf(dns, domain, sources, config.hostname)
    if return_domain != domain:
        checks += check_spf(dns, return_domain, sources, config.hostname)
    checks += check_dkim(dns, domain, keys)
    checks += check_dmarc(dns, domain, return_domain, keys)
    checks += check_ptr(dns, sources)
    checks += check_receiving(dns, domain)
    return checks


def main(argv: list[str] | None = None) -> int:
    from twisted.internet import task, threads
    from twisted.python.threadpool import ThreadPool

    from pymta.auth.dkim import DkimKeyError, DkimSigner
    from pymta.config import ConfigError, default_config_path, load_config
    from pymta.dns import Resolver

    parser = argparse.ArgumentParser(prog="pymta-check", description=__doc__.splitlines()[0])
    parser.add_argument("domain")
    parser.add_argument("--config", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config or default_config_path())
        signer = DkimSigner(config.dkim, config.path, None) if config.dkim else None
    except (ConfigError, DkimKeyError) as e:
        sys.stderr.write(f"pymta-check: {e}\n")
        return 2
    outcome: dict[str, Any] = {}

    def run(reactor: Any) -> Any:
        pool = ThreadPool(1, 4, name="pymta-check-dns")
        pool.start()
        reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
        resolver = Resolver(reactor, pool, config.dns.servers, timeout=config.dns.timeout)
        dns = V.ResolverDNS(reactor, resolver, budget=max(30.0, config.dns.timeout * 20))
        d = threads.deferToThread(run_checks, config, args.domain, dns, signer)
        return d.addCallback(lambda checks: outcome.update(checks=checks))

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            return int(e.code)
    checks = outcome.get("checks", [])
    if args.json:
        print(json.dumps({"domain": args.domain, "checks": [asdict(c) for c in checks],
                          "ok": not any(c.status == FAIL for c in checks)}, indent=2))  # fmt: skip
    else:
        for c in checks:
            print(c.line())
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
