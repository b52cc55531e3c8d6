"""Signed DNS on loopback for DANE tests: Debian's ``knot`` serves zones it signs itself (automatic
DNSSEC signing), behind a validating ``unbound`` that trusts their keys. Both run as child
processes on free loopback ports and are stopped by PID.

Zones are text (``{"dane.test": "@ MX 10 mx\\nmx A 127.0.0.2\\n..."}``). Every zone is signed; a
zone named in ``bogus`` gets a trust anchor in unbound that is not its key, so every answer from
it is bogus (SERVFAIL), as a broken or forged signature would be. A zone in ``unsigned`` is served
without signatures (an insecure delegation: answers without the AD bit).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from tests.dnsserver import free_udp_port

KNOTD = "/usr/sbin/knotd"
UNBOUND = "/usr/sbin/unbound"
SOA = "@ SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 30\n@ NS ns.{zone}.\nns A 127.0.0.1\n"


def available() -> str | None:
    """None when knot and unbound are installed, else what is missing."""
    missing = [p for p in (KNOTD, UNBOUND) if not os.access(p, os.X_OK)]
    return f"{', '.join(missing)} not installed (apt-get install knot unbound)" if missing else None


def _wait(check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout:g}s ({last})")


class SignedDNS:
    """``start()`` brings up knot and unbound; ``address`` is unbound's "127.0.0.1:PORT"; ``stop()``."""

    def __init__(self, directory: str, zones: dict[str, str], bogus: tuple[str, ...] = (),
                 unsigned: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.dir = directory
        self.zones = zones
        self.bogus = bogus
        self.unsigned = unsigned
        self.knot_port = free_udp_port()
        self.unbound_port = free_udp_port()
        self.address = f"127.0.0.1:{self.unbound_port}"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> SignedDNS:
        try:
            self._start_knot()
            anchors = self._anchors()
            self._start_unbound(anchors)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_knot(self) -> None:
        root = os.path.join(self.dir, "knot")
        os.makedirs(os.path.join(root, "run"), exist_ok=True)
        zones_conf = []
        for zone, text in self.zones.items():
            with open(os.path.join(root, f"{zone}.zone"), "w") as f:
                f.write(f"$ORIGIN {zone}.\n$TTL 60\n" + SOA.format(zone=zone) + text + "\n")
            signing = "off" if zone in self.unsigned else "on"
            zones_conf.append(f"  - domain: {zone}\n    file: {zone}.zone\n    dnssec-signing: {signing}\n")
        conf = os.path.join(root, "knot.conf")
        with open(conf, "w") as f:
            f.write(
                f"server:\n  rundir: {root}/run\n  listen: 127.0.0.1@{self.knot_port}\n"
                f"database:\n  storage: {root}\n"
                f"log:\n  - target: {root}/knot.log\n    any: info\n"
                f"template:\n  - id: default\n    storage: {root}\n    zonefile-sync: -1\n    journal-content: none\n"
                f"zone:\n{''.join(zones_conf)}"
            )  # fmt: skip
        self.procs.append(subprocess.Popen([KNOTD, "-c", conf], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

    def _query(self, name: str, rdtype: str, port: int, dnssec: bool = True) -> Any:
        q = dns.message.make_query(name, rdtype, want_dnssec=dnssec)
        return dns.query.udp(q, "127.0.0.1", timeout=1.0, port=port)

    def _anchors(self) -> list[str]:
        keys: dict[str, list[Any]] = {}
        for zone in self.zones:
            if zone in self.unsigned:
                continue

            def signed(zone: str = zone) -> Any:
                answer = self._query(zone + ".", "DNSKEY", self.knot_port)
                found = [rr for rrset in answer.answer if rrset.rdtype == dns.rdatatype.DNSKEY for rr in rrset]
                sigs = [rrset for rrset in answer.answer if rrset.rdtype == dns.rdatatype.RRSIG]
                return found if found and sigs else None

            found = _wait(signed, f"knot signing {zone}")
            keys[zone] = [k for k in found if k.flags & 1] or found
        anchors = []
        for zone in keys:
            # A bogus zone is anchored on another zone's key: its signatures never validate.
            source = next((z for z in keys if z != zone), None) if zone in self.bogus else zone
            if source is None:
                raise ValueError("a bogus zone needs another signed zone")
            anchors.extend(f'trust-anchor: "{zone}. DNSKEY {k.to_text()}"' for k in keys[source])
        return anchors

    def _start_unbound(self, anchors: list[str]) -> None:
        root = os.path.join(self.dir, "unbound")
        os.makedirs(root, exist_ok=True)
        stubs = "".join(f'stub-zone:\n  name: "{z}"\n  stub-addr: 127.0.0.1@{self.knot_port}\n' for z in self.zones)
        insecure = "".join(f'  domain-insecure: "{z}"\n' for z in self.unsigned)
        conf = os.path.join(root, "unbound.conf")
        with open(conf, "w") as f:
            f.write(
                "server:\n"
                f"  interface: 127.0.0.1@{self.unbound_port}\n  port: {self.unbound_port}\n"
                "  do-ip6: no\n  do-daemonize: no\n  use-syslog: no\n  username: \"\"\n  chroot: \"\"\n"
                f"  directory: \"{root}\"\n  pidfile: \"{root}/unbound.pid\"\n  logfile: \"{root}/unbound.log\"\n"
                "  access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  verbosity: 1\n"
                "  val-log-level: 2\n  harden-dnssec-stripped: yes\n  module-config: \"validator iterator\"\n"
                "  qname-minimisation: no\n  aggressive-nsec: no\n  num-threads: 1\n"
                "  local-zone: \"test.\" nodefault\n"  # RFC 6761 names are answered locally by default
                f"{insecure}" + "".join(f"  {a}\n" for a in anchors) + "remote-control:\n  control-enable: no\n" + stubs
            )  # fmt: skip
        self.procs.append(subprocess.Popen([UNBOUND, "-d", "-c", conf], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        first = next(iter(self.zones))
        _wait(lambda: self._query(f"{first}.", "SOA", self.unbound_port, dnssec=False), "unbound")

    def log(self) -> str:
        out = []
        for name in ("knot/knot.log", "unbound/unbound.log"):
            try:
                with open(os.path.join(self.dir, name)) as f:
                    out.append(f"--- {name}\n{f.read()[-4000:]}")
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()


def tlsa_for(cert_path: str, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    """The TLSA record data ("3 1 1 HEX") for the certificate in ``cert_path``."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    data = cert.public_bytes(serialization.Encoding.DER) if selector == 0 else cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    digest = {0: lambda d: d, 1: lambda d: hashlib.sha256(d).digest(), 2: lambda d: hashlib.sha512(d).digest()}[mtype]
    return f"{usage} {selector} {mtype} {digest(data).hex()}"


def cleanup_dir(path: str) -> None:
    shutil.rmtree(path, True)
