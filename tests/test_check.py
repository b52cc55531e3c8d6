"""pymta-check against a good and a broken zone served by the loopback DNS server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pymta.auth.dkim import load_key
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import ROOT
from tests.test_dkim import txt

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def setup(tmp_path):
    key = rsa.generate_private_key(65537, 2048)
    (tmp_path / "dkim.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))  # fmt: skip
    from pymta.auth.dkim import SigningKey

    algorithm, private = load_key(str(tmp_path / "dkim.pem"), None, "t")
    record = SigningKey("example.org", "s1", algorithm, private, "-").public_record()
    other = SigningKey("example.org", "s1", algorithm, rsa.generate_private_key(65537, 2048), "-").public_record()
    return tmp_path, record, other


def write_config(tmp_path, dns_address: str) -> str:
    path = tmp_path / "pymta.toml"
    path.write_text(f"""
hostname = "mta.example.org"
state_dir = "{tmp_path}/var"
[dns]
servers = ["{dns_address}"]
timeout = "1s"
[sources.one]
address = "192.0.2.10"
ehlo = "mta.example.org"
[feedback]
bounce_domain = "bounces.example.org"
secret = "0123456789abcdef0123"
[dkim."example.org"]
selector = "s1"
key = "{tmp_path}/dkim.pem"
""")
    return str(path)


def run_check(config: str, *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from pymta.auth.check import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "example.org", "--config", config, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)  # fmt: skip


GOOD = {
    "example.org": {"TXT": ['"v=spf1 ip4:192.0.2.10 -all"']},
    "bounces.example.org": {"TXT": ['"v=spf1 include:example.org -all"']},
    "_dmarc.example.org": {"TXT": ['"v=DMARC1; p=reject; rua=mailto:d@example.org"']},
    "10.2.0.192.in-addr.arpa": {"PTR": ["mta.example.org."]},
    "mta.example.org": {"A": ["192.0.2.10"]},
    "_mta-sts.example.org": {"TXT": ['"v=STSv1; id=20261201"']},
    "_smtp._tls.example.org": {"TXT": ['"v=TLSRPTv1; rua=mailto:tls@example.org"']},
}


def test_a_good_zone_passes_every_check(setup):
    tmp_path, record, _ = setup
    zone = dict(GOOD, **{"s1._domainkey.example.org": {"TXT": [txt(record)]}})
    server = DNSServer(Zone(zone)).start()
    try:
        out = run_check(write_config(tmp_path, server.address))
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert all(line.startswith("ok ") for line in lines), lines
        checks = {line.split(":")[0].split(None, 1)[1] for line in lines}
        assert {"spf example.org", "spf bounces.example.org", "dkim s1._domainkey.example.org", "dmarc example.org",
                "ptr 192.0.2.10", "mta-sts example.org", "tls-rpt example.org"} <= checks  # fmt: skip
        as_json = json.loads(run_check(write_config(tmp_path, server.address), "--json").stdout)
        assert as_json["ok"] is True
        assert len(as_json["checks"]) == len(lines)
    finally:
        server.stop()


def test_a_broken_zone_fails_and_says_what_to_publish(setup):
    tmp_path, record, other = setup
    zone = {
        "example.org": {"TXT": ['"v=spf1 ip4:198.51.100.1 -all"']},  # not our source address
        "bounces.example.org": {"TXT": ['"v=spf1 -all"', '"v=spf1 +all"']},  # two records
        "s1._domainkey.example.org": {"TXT": [txt(other)]},  # someone else's key
        "10.2.0.192.in-addr.arpa": {"PTR": ["host-10.isp.example."]},  # generic, not forward-confirmed
    }
    server = DNSServer(Zone(zone)).start()
    try:
        out = run_check(write_config(tmp_path, server.address))
        assert out.returncode == 1, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        by_check = {line.split(":")[0].split(None, 1)[1]: line for line in lines}
        assert by_check["spf example.org"].startswith("fail")
        assert 'publish TXT "v=spf1 ip4:192.0.2.10 -all"' in \
            by_check["spf example.org"]
        assert "2 SPF records" in by_check["spf bounces.example.org"]
        assert by_check["dkim s1._domainkey.example.org"].startswith("fail")
        assert record in by_check[
            "dkim s1._domainkey.example.org"]
        assert by_check["dmarc example.org"].startswith("fail dmarc example.org: no DMARC record; publish TXT at _dmarc")
        assert by_check["ptr 192.0.2.10"].startswith("fail")
        assert "does not resolve back" in by_check["ptr 192.0.2.10"]
        assert by_check["mta-sts example.org"].startswith("warn")
        as_json = json.loads(run_check(write_config(tmp_path, server.address), "--json").stdout)
        assert as_json["ok"] is False
    finally:
        server.stop()
