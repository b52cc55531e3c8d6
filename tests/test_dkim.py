"""DKIM signing: keys from the config, signatures checked by an independent verifier (Perl's
Mail::DKIM) with the public keys served by the loopback DNS server, and through twistd."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import textwrap
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import task

from pymta.auth.dkim import DkimKeyError, DkimSigner, from_domain, load_key
from pymta.config import ConfigError, build_config
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess

HERE = os.path.dirname(os.path.abspath(__file__))
VERIFIER = os.path.join(HERE, "mail_dkim_verify.pl")
needs_perl = pytest.mark.skipif(
    subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True).returncode != 0,
    reason="Mail::DKIM (libmail-dkim-perl) is not installed (tests/run.sh installs it)",
)


def _can_run_opendkim() -> bool:
    """opendkim-testmsg asks the resolv.conf name server on port 53: it runs in a mount namespace
    whose resolv.conf names a test DNS server on a loopback address (needs root and unshare)."""
    if not shutil.which("opendkim-testmsg") or not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_opendkim = pytest.mark.skipif(not _can_run_opendkim(), reason="opendkim-testmsg (opendkim-tools) as root needed")

BODY = (
    b"Plain first line.\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    + b"x" * 990 + b"\r\n"  # a long line (998 octets is the limit)
    + "8-bit: caf\u00e9 na\u00efve \u65e5\u672c\u8a9e\r\n".encode()
    + b"trailing spaces   \r\n\r\n\r\n"
)


def message(subject: str = "hello") -> bytes:
    return (
        b"From: Sender <news@mail.example.org>\r\n"
        b"To: Someone <someone@example.net>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <dkim-1@example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + BODY
    )


def write_key(path: str, kind: str = "rsa", bits: int = 2048) -> str:
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else rsa.generate_private_key(65537, bits)
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    return path


def txt(record: str) -> str:
    """A TXT record in zone-file form, split into strings of at most 255 octets."""
    return " ".join(f'"{record[i : i + 250]}"' for i in range(0, len(record), 250))


def config_for(tmp_path, dkim_toml: str):
    path = tmp_path / "pymta.toml"
    return build_config(
        __import__("tomllib").loads(f'state_dir = "{tmp_path}/var"\n' + textwrap.dedent(dkim_toml)), str(path)
    )


def signer_for(tmp_path, dkim_toml: str, now: float = 0.0) -> DkimSigner:
    config = config_for(tmp_path, dkim_toml)
    clock = task.Clock()
    clock.advance(now)
    return DkimSigner(config.dkim, config.path, clock)


def verify(message: bytes, dns_port: int, mode: str = "dkim") -> list[str]:
    out = subprocess.run(["perl", VERIFIER, str(dns_port), mode], input=message, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().splitlines()


@pytest.fixture
def keys(tmp_path):
    return {
        "rsa": write_key(str(tmp_path / "rsa.pem")),
        "ed25519": write_key(str(tmp_path / "ed.pem"), "ed25519"),
    }


@pytest.fixture
def zone53(tmp_path):
    """A DNS server on port 53 of a random 127.53.x.y address, and a resolv.conf naming it."""
    import random

    z = Zone({})
    for _ in range(20):
        host = f"127.53.{random.randrange(256)}.{random.randrange(1, 255)}"
        try:
            server = DNSServer(z, host=host, port=53).start()
            break
        except OSError:
            continue
    else:
        pytest.skip("no free port 53 on 127.53.0.0/16")
    (tmp_path / "resolv.conf").write_text(f"nameserver {host}\n")
    yield z, str(tmp_path / "resolv.conf")
    server.stop()


def opendkim_verify(message: bytes, resolv_conf: str) -> tuple[int, str]:
    """(exit status, complaint) of OpenDKIM's opendkim-testmsg on ``message``: 0 is a valid signature."""
    script = f"mount --bind {resolv_conf} /etc/resolv.conf && exec opendkim-testmsg"
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], input=message, capture_output=True, timeout=60)
    return out.returncode, out.stderr.decode().strip()


@pytest.fixture
def zone():
    z = Zone({})
    server = DNSServer(z).start()
    yield z, server
    server.stop()


def publish(z: Zone, signer: DkimSigner) -> None:
    for keys in signer.keys.values():
        for key in keys:
            z.records[f"{key.selector}._domainkey.{key.domain}."] = {"TXT": [txt(key.public_record())]}


# -- keys and configuration -------------------------------------------------------------------


def test_the_canonicalisation_shortcuts_give_dkimpys_results_on_any_message():
    """split_message, ParsedDKIM and the body canonicalisations against dkimpy's own parser and
    functions, over random messages: CRLF, bare LF and CR, tabs and runs of spaces, folded
    headers, trailing empty lines, CRs and LFs and whitespace, no body, no blank line."""
    import random

    import dkim
    from dkim.canonicalization import CanonicalizationPolicy

    from pymta.auth.dkim import (
        DKIMPY_RELAXED_BODY,
        DKIMPY_SIMPLE_BODY,
        ParsedDKIM,
        canonical_body,
        split_message,
        use_fast_body_canonicalisation_in_dkimpy,
    )

    rng = random.Random(6376)
    head_parts = [b"From: a@example.com", b"Subject: x", b"To: b@example.org", b"\tfolded", b" cont"]
    body_parts = [b"word", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\n", b"\r", b".", b"\r\n\r\n", b"x y", b"\n\r", b"\r\r\n"]
    for _ in range(3000):
        head = b"".join(rng.choice(head_parts[:3]) + b"\r\n" + (rng.choice(head_parts[3:]) + b"\r\n" if rng.random() < 0.3 else b"")
                        for _ in range(rng.randint(1, 3)))
        body = b"".join(rng.choice(body_parts) for _ in range(rng.randint(0, 15)))
        message = head + rng.choice([b"\r\n", b"\n", b""]) + body
        try:
            expected = dkim.rfc822_parse(message)
        except dkim.MessageFormatError:
            continue
        assert split_message(message) == expected, message
        parsed = ParsedDKIM(message)
        assert (parsed.headers, parsed.body) == expected, message
        for raw in (expected[1], body):  # as parsed, and with whatever line ends the test made
            assert canonical_body(raw, True) == DKIMPY_RELAXED_BODY(raw), raw
            assert canonical_body(raw, False) == DKIMPY_SIMPLE_BODY(raw), raw
        use_fast_body_canonicalisation_in_dkimpy()  # what verification then runs: still dkimpy's results
        for c in (b"relaxed/relaxed", b"simple/relaxed"):
            assert CanonicalizationPolicy.from_c_value(c).canonicalize_body(body) == DKIMPY_RELAXED_BODY(body), (c, body)
        assert CanonicalizationPolicy.from_c_value(b"simple/simple").canonicalize_body(body) == DKIMPY_SIMPLE_BODY(body)


@pytest.mark.timeout(30)
def test_body_canonicalisation_is_linear_where_dkimpys_regex_is_quadratic():
    """A line of 997 spaces and an x, 20,000 times (20 MB, what any sender may put in a signed
    message): dkimpy's trailing-WSP regex scans each run once per octet of it, about 35 s here
    with the GIL held (1.7 ms a line); ours scans it once. On a regression this test runs into
    its timeout instead of passing; a million trailing CRLFs take one C-level step too."""
    from pymta.auth.dkim import DKIMPY_RELAXED_BODY, relaxed_body, strip_empty_lines

    line = b" " * 997 + b"x\r\n"
    assert relaxed_body(line * 3 + b" \r\n") == DKIMPY_RELAXED_BODY(line * 3 + b" \r\n")
    assert relaxed_body(line * 20_000 + b" \r\n" + b"\r\n" * 1_000_000) == b" x\r\n" * 20_000
    assert strip_empty_lines(b"x" + b"\r\n" * 1_000_000) == b"x\r\n"


def test_a_short_rsa_key_is_a_one_line_error_naming_the_file(tmp_path):
    path = write_key(str(tmp_path / "short.pem"), bits=1024)
    with pytest.raises(DkimKeyError) as e:
        load_key(path, None, "pymta.toml: dkim.example.org.key")
    assert str(e.value).count("\n") == 0
    assert "short.pem" in str(e.value)
    assert "1024 bits" in str(e.value)


def test_missing_and_unreadable_keys_are_one_line_errors(tmp_path):
    with pytest.raises(DkimKeyError, match=r"cannot read .*nope\.pem"):
        load_key(str(tmp_path / "nope.pem"), None, "x")
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DkimKeyError, match=r"garbage\.pem is not a usable PEM private key") as e:
        load_key(str(tmp_path / "garbage.pem"), None, "x")
    assert "\n" not in str(e.value)


def test_the_algorithm_must_match_the_key(tmp_path, keys):
    with pytest.raises(DkimKeyError, match="ed25519 key, not for rsa-sha256"):
        load_key(keys["ed25519"], "rsa-sha256", "x")


def test_config_errors_name_the_key(tmp_path, keys):
    with pytest.raises(ConfigError, match=r"dkim\.default\.domain: needed"):
        config_for(tmp_path, f'[dkim.default]\nselector = "s1"\nkey = "{keys["rsa"]}"\n')
    with pytest.raises(ConfigError, match=r"dkim\.example\.org\.key: one key per selector"):
        config_for(tmp_path, f'[dkim."example.org"]\nselector = ["a", "b"]\nkey = "{keys["rsa"]}"\n')
    with pytest.raises(ConfigError, match=r"dkim\.example\.org\.headers: From must be signed"):
        config_for(tmp_path, f'[dkim."example.org"]\nselector = "a"\nkey = "{keys["rsa"]}"\nheaders = ["To"]\n')
    with pytest.raises(ConfigError, match=r"dkim\.example\.org\.headers: X-Pymta-Pool is pymta's own header"):
        config_for(tmp_path, f'[dkim."example.org"]\nselector = "a"\nkey = "{keys["rsa"]}"\nheaders = ["From", "X-Pymta-Pool"]\n')
    with pytest.raises(ConfigError, match=r"acl\.rcpt\[1\]\.dmarc: sender verdicts are known at the data stage"):
        config_for(tmp_path, '[[acl.rcpt]]\ndmarc = "fail"\naction = "reject"\n')


def test_keys_are_chosen_by_from_domain_parent_domain_or_default(tmp_path, keys):
    signer = signer_for(tmp_path, f"""
        [dkim."example.org"]
        selector = "s1"
        key = "{keys["rsa"]}"
        [dkim.default]
        domain = "esp.example"
        selector = "esp"
        key = "{keys["ed25519"]}"
    """)
    assert [k.domain for k in signer.keys_for("example.org")] == ["example.org"]
    assert [k.domain for k in signer.keys_for("mail.example.org")] == ["example.org"]
    assert [k.domain for k in signer.keys_for("other.example")] == ["esp.example"]
    assert [k.domain for k in signer.keys_for(None)] == ["esp.example"]


def test_an_authenticated_user_named_by_a_table_signs_with_its_key(tmp_path, keys):
    signer = signer_for(tmp_path, f"""
        [dkim."customer.example"]
        selector = "s1"
        key = "{keys["rsa"]}"
        users = ["shop"]
        [dkim.default]
        domain = "esp.example"
        selector = "esp"
        key = "{keys["ed25519"]}"
    """)
    assert [k.domain for k in signer.keys_for("shop-mail.example", "shop")] == ["customer.example"]
    assert [k.domain for k in signer.keys_for("shop-mail.example", "other")] == ["esp.example"]
    assert b"d=customer.example;" in signer.sign(message(), user="shop")


def test_from_domain_needs_exactly_one_from_address():
    assert from_domain(b"From: A <a@Example.ORG>\r\nTo: b@x\r\n\r\nbody") == "example.org"
    assert from_domain(b"From: a@x.example\r\nFrom: b@y.example\r\n\r\n") is None
    assert from_domain(b"From: a@x.example, b@y.example\r\n\r\n") is None
    assert from_domain(b"To: b@x\r\n\r\n") is None


def test_h_lists_present_headers_and_oversigns_from(tmp_path, keys):
    signer = signer_for(tmp_path, f'[dkim."example.org"]\nselector = "s1"\nkey = "{keys["rsa"]}"\n')
    signature = signer.signatures(message()).decode()
    h = signature.replace("\r\n ", "").split("h=", 1)[1].split(";", 1)[0].split(":")
    assert h.count("from") == 2  # From is present once, listed twice: another From breaks the signature
    assert "list-unsubscribe" not in h
    assert "cc" not in h
    assert {"to", "subject", "date", "message-id", "mime-version", "content-type"} <= set(h)
    assert "t=0;" in signature.replace("\r\n ", " ")  # the injected clock, not the wall clock


def test_mail_without_a_key_for_its_domain_is_not_signed(tmp_path, keys):
    signer = signer_for(tmp_path, f'[dkim."example.com"]\nselector = "s1"\nkey = "{keys["rsa"]}"\n')
    assert signer.sign(message()) == message()


# -- an independent verifier --------------------------------------------------------------------


@needs_perl
@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_mail_dkim_verifies_our_rsa_signature_and_a_changed_byte_fails(tmp_path, keys, zone, canonicalization):
    z, server = zone
    signer = signer_for(tmp_path, f"""
        [dkim."example.org"]
        selector = "sel-rsa"
        key = "{keys["rsa"]}"
        canonicalization = "{canonicalization}"
    """, now=time.time())
    publish(z, signer)
    signed = signer.sign(message())
    assert signed.endswith(message())
    lines = verify(signed, server.port)
    assert lines == ["pass example.org rsa-sha256 pass", "overall pass"]
    changed = signed.replace(b"caf\xc3\xa9", b"caf\xc3\xa8")
    assert changed != signed
    assert verify(changed, server.port)[-1] == "overall fail"
    header_changed = signed.replace(b"Subject: hello", b"Subject: hellO")
    assert verify(header_changed, server.port)[-1] == "overall fail"


@needs_opendkim
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_opendkim_verifies_our_rsa_and_ed25519_signatures_and_a_changed_byte_fails(tmp_path, keys, zone53, kind):
    # Debian 12's Mail::DKIM has no Ed25519; OpenDKIM 2.11 has.
    z, resolv_conf = zone53
    signer = signer_for(tmp_path, f'[dkim."example.org"]\nselector = "sel-{kind}"\nkey = "{keys[kind]}"\n', now=time.time())
    publish(z, signer)
    signed = signer.sign(message())
    assert b"a=ed25519-sha256" in signed if kind == "ed25519" else b"a=rsa-sha256" in signed
    assert opendkim_verify(signed, resolv_conf) == (0, "")
    status, complaint = opendkim_verify(signed.replace(b"..two dots", b"..tw0 dots"), resolv_conf)
    assert status != 0
    assert "Bad signature" in complaint
    assert any(name.startswith(f"sel-{kind}._domainkey.example.org") for name, _ in z.queries)


@needs_perl
def test_two_selectors_sign_twice_rsa_and_ed25519(tmp_path, keys, zone):
    z, server = zone
    signer = signer_for(tmp_path, f"""
        [dkim."example.org"]
        selector = ["r2026", "e2026"]
        key = ["{keys["rsa"]}", "{keys["ed25519"]}"]
    """, now=time.time())
    publish(z, signer)
    lines = verify(signer.sign(message()), server.port)
    # Mail::DKIM passes the RSA one; the Ed25519 one is for receivers that know it (RFC 8463)
    assert sorted(line.split()[:3] for line in lines[:-1]) == [
        ["invalid", "example.org", "ed25519-sha256"], ["pass", "example.org", "rsa-sha256"]]
    assert lines[-1] == "overall pass"


@needs_perl
def test_an_added_from_header_breaks_the_signature(tmp_path, keys, zone):
    z, server = zone
    signer = signer_for(tmp_path, f'[dkim."example.org"]\nselector = "s1"\nkey = "{keys["rsa"]}"\n', now=time.time())
    publish(z, signer)
    signed = signer.sign(message())
    assert verify(b"From: evil@example.net\r\n" + signed, server.port)[-1] == "overall fail"
    # a header outside h= (a later hop's trace header) leaves it valid
    assert verify(b"X-Trace: hop\r\n" + signed, server.port)[-1] == "overall pass"


def test_reload_rereads_the_key_files_and_keeps_the_old_keys_on_error(tmp_path, keys):
    signer = signer_for(tmp_path, f'[dkim."example.org"]\nselector = "s1"\nkey = "{keys["rsa"]}"\n')
    before = signer.keys["example.org"][0].public_record()
    write_key(keys["rsa"])
    assert signer.reload() is True
    after = signer.keys["example.org"][0].public_record()
    assert after != before
    with open(keys["rsa"], "wb") as f:
        f.write(b"broken")
    assert signer.reload() is False
    assert signer.keys["example.org"][0].public_record() == after


# -- through twistd -------------------------------------------------------------------------------


def maildir_crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@needs_perl
@pytest.mark.timeout(180)
def test_twistd_signs_trusted_mail_once_and_rereads_keys_on_sighup(tmp_path, keys, zone):
    z, server = zone
    shutil.copy(keys["rsa"], tmp_path / "dkim.pem")
    mta = MTAProcess(str(tmp_path), dns=server.address, extra_config=f"""
        [dkim."example.org"]
        selector = "s1"
        key = "{tmp_path / "dkim.pem"}"
    """)
    config = config_for(tmp_path, f'[dkim."example.org"]\nselector = "s1"\nkey = "{tmp_path / "dkim.pem"}"\n')
    first = DkimSigner(config.dkim, config.path, task.Clock())
    publish(z, first)
    mta.start()
    try:
        msg = message().replace(b"someone@example.net", b"alice@example.test")
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("news@mail.example.org", ["alice@example.test"], msg)
        [stored] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="delivery")
        stored = maildir_crlf(stored)
        assert stored.count(b"DKIM-Signature:") == 1
        lines = verify(stored, server.port)
        assert lines[-1] == "overall pass", lines
        # SIGHUP: the rotated key file is read; mail from then on verifies with the new record
        write_key(str(tmp_path / "dkim.pem"))
        mta.proc.send_signal(signal.SIGHUP)
        mta.wait_for(lambda: any(e.get("event") == "dkim_reloaded" for e in mta.log_events()), what="reload")
        first.reload()
        publish(z, first)
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("news@mail.example.org", ["alice@example.test"], msg.replace(b"hello", b"second"))
        messages = mta.wait_for(lambda: (m := mta.maildir_messages("alice@example.test")) and len(m) == 2 and m,
                                what="second delivery")  # fmt: skip
        second = next(maildir_crlf(m) for m in messages if b"second" in m)
        assert verify(second, server.port)[-1] == "overall pass"
        assert verify(stored, server.port)[-1] == "overall fail"  # the old key's record is gone
    finally:
        mta.stop()


def test_twistd_refuses_to_start_with_a_short_key(tmp_path):
    short = write_key(str(tmp_path / "short.pem"), bits=1024)
    mta = MTAProcess(str(tmp_path), extra_config=f'[dkim."example.org"]\nselector = "s1"\nkey = "{short}"\n')
    proc = subprocess.run(mta.twistd_command(), cwd=str(tmp_path), capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr.decode().strip().splitlines()
    assert err == [f"pymta: configuration error: {mta.config_path}: dkim.example.org.key: {short}: RSA key of 1024 bits, "
                   "at least 2048 needed"]  # fmt: skip


@needs_perl
@pytest.mark.timeout(180)
def test_mail_injected_over_http_is_signed_once(tmp_path, keys, zone):
    import json
    import urllib.request

    from pymta.admin.http.tokens import digest
    from tests.mta_process import free_port, wait_for_port

    z, server = zone
    token = "inject-token-0123456789abcdefghijklmno"
    (tmp_path / "tokens").write_text(f"crm:inject:{digest(token)}\n")
    api_port = free_port()
    dkim_toml = f'[dkim."example.org"]\nselector = "s1"\nkey = "{keys["rsa"]}"\n'
    mta = MTAProcess(str(tmp_path), dns=server.address, extra_config=f"""
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        tokens_file = "{tmp_path / "tokens"}"
        """ + dkim_toml)  # fmt: skip
    publish(z, signer_for(tmp_path, dkim_toml))
    mta.start()
    try:
        wait_for_port("127.0.0.1", api_port, 30)
        request = {"envelope_sender": "news@example.org",
                   "recipients": [{"email": "alice@example.test", "substitutions": {"first": "Alice"}}],
                   "content": {"from": {"email": "news@example.org"}, "subject": "Hello {{ first }}",
                               "text_body": "Dear {{ first }},\n.a dotted line\ncaf\u00e9\n"}}  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/v1/inject", json.dumps(request).encode(),
                                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["success_count"] == 1
        [stored] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="delivery")
        stored = maildir_crlf(stored)
        assert stored.count(b"DKIM-Signature:") == 1
        assert verify(stored, server.port)[-1] == "overall pass"
    finally:
        mta.stop()
