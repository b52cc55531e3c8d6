"""Operator suspensions through the real ``twistd pymta``: over HTTP and ``pymta-queue``, holding
mail without using attempts, kept across a restart, lifted on demand; and the store on a fake clock."""

from __future__ import annotations

import json
import os
import smtplib

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task

from pymta.admin.http.tokens import digest
from pymta.state.suspensions import SQLiteSuspensions, parse_duration
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port, wait_for_port
from tests.test_e2e_relay import Sink, run_cli
from tests.test_http_api import Client

pytestmark = pytest.mark.timeout(180)

ADMIN = "admin-token-0123456789abcdefghijklmnop"
READ = "read-token-0123456789abcdefghijklmnopq"


def start_with_api(tmp_path, dns: DNSServer | None, smtp_port: int, extra: str = "") -> tuple[MTAProcess, Client]:
    """The MTA relaying to 127.0.0.8:``smtp_port``, with the admin API and an admin and a read token."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokens = tmp_path / "api-tokens"
    tokens.write_text(f"ops:admin:{digest(ADMIN)}\nviewer:read:{digest(READ)}\n")
    api_port = free_port()
    mta = MTAProcess(str(tmp_path), dns=dns.address if dns else None, smtp_port=smtp_port, extra_config=extra + f"""
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        tokens_file = "{tokens}"
        """).start()  # fmt: skip
    wait_for_port("127.0.0.1", api_port, 30)
    client = Client(api_port)
    client.port = api_port
    return mta, client


def test_a_suspension_lapses_by_itself_and_survives_reopening(tmp_path):
    clock = task.Clock()
    clock.advance(1000)
    path = str(tmp_path / "suspensions.sqlite")
    store = SQLiteSuspensions(path, clock)
    row = store.add("domain", "Remote.Test.", 3600, "abuse desk asked")
    assert row["value"] == "remote.test"
    assert row["until"] == 4600
    assert store.match(domain="remote.test")["reason"] == "abuse desk asked"
    assert store.match(domain="other.test", tenant="acme") is None
    store.close()
    store = SQLiteSuspensions(path, clock)
    assert [r["id"] for r in store.in_force()] == [row["id"]]
    clock.advance(3600)
    assert store.match(domain="remote.test") is None
    assert store.in_force() == []
    with pytest.raises(ValueError):
        store.add("planet", "x", 60, "r")
    for bad in ("soon", "0s", "-1h", "400d", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_duration("90m") == 5400
    assert parse_duration(30) == 30


@pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed")
def test_suspension_holds_mail_without_attempts_survives_a_restart_and_lifts(tmp_path):
    port = free_port("127.0.0.8")
    dns = DNSServer(Zone({"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.8"]}})).start()
    sink = Sink("127.0.0.8", port)
    mta, api = start_with_api(tmp_path, dns, port)
    try:
        status, row, _ = api.call("POST", "/api/v1/suspend", {"domain": "remote.test", "duration": "2h",
                                                                "reason": "abuse desk asked"})  # fmt: skip
        assert status == 201, row
        assert row["kind"] == "domain", row
        assert row["value"] == "remote.test", row
        assert api.call("POST", "/api/v1/suspend", {"domain": "a.test", "tenant": "b"})[0] == 400
        assert api.call("POST", "/api/v1/suspend", {"domain": "a.test", "duration": "soon"})[0] == 400
        assert api.call("POST", "/api/v1/suspend", {"domain": "a.test"}, token=READ)[0] == 403

        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("s@example.org", ["r@remote.test"], "Subject: held\r\n\r\nbody\r\n")
        [name] = mta.wait_for(lambda: mta.queue_files("deferred"), what="the suspended message deferred")
        qid = name.split(".")[0]
        status, shown, _ = api.call("GET", f"/api/v1/messages/{qid}")
        assert shown["attempts"] == 0, shown
        assert shown["recipients"][0]["attempts"] == 0, shown
        assert shown["recipients"][0]["reply"]["text"].startswith("Suspended by the operator"), shown
        assert "abuse desk asked" in shown["recipients"][0]["reply"]["text"]
        assert sink.messages() == []

        status, shaping, _ = api.call("GET", "/api/v1/shaping", token=READ)
        assert [(s["value"], s["reason"]) for s in shaping["suspensions"]] == [("remote.test", "abuse desk asked")]
        cli = run_cli(mta, "queue_main", "suspend", "--tenant", "acme", "--duration", "30m", "--reason", "paused tenant")
        assert cli.returncode == 0, cli.stderr
        cli = run_cli(mta, "queue_main", "shaping")
        assert cli.returncode == 0, cli
        assert "abuse desk asked" in cli.stdout, cli
        assert "paused tenant" in cli.stdout, cli

        mta.stop()
        mta.start()
        wait_for_port("127.0.0.1", api.port, 30)
        status, listing, _ = api.call("GET", "/api/v1/suspend", token=READ)
        assert status == 200
        assert sorted(s["reason"] for s in listing["suspensions"]) == ["abuse desk asked", "paused tenant"]
        assert [n.split(".")[0] for n in mta.queue_files("deferred")] == [qid]

        status, lifted, _ = api.call("DELETE", f"/api/v1/suspend/{row['id']}")
        assert status == 200, lifted
        assert lifted["lifted"]["id"] == row["id"], lifted
        assert lifted["flushed"] == 1, lifted
        mta.wait_for(lambda: sink.messages(), what="the message delivered once the suspension is lifted")
        assert api.call("DELETE", f"/api/v1/suspend/{row['id']}")[0] == 404
        cli = run_cli(mta, "queue_main", "--json", "suspensions")
        assert [s["value"] for s in json.loads(cli.stdout)["suspensions"]] == ["acme"], cli

        def samples() -> dict[tuple[str, tuple], float]:
            text = api.call("GET", "/metrics", token=None)[1]
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip

        mta.wait_for(lambda: any(k[0] == "pymta_outbound_tls_total" for k in samples()), what="the TLS outcome counted")
        now = samples()
        assert now[("pymta_suspensions", (("kind", "tenant"),))] == 1
        assert ("pymta_suspensions", (("kind", "domain"),)) not in now
        assert now[("pymta_dns_lookups_total", (("rdtype", "MX"), ("result", "ok")))] >= 1, now
        # smtp-sink offers no STARTTLS: the opportunistic policy delivered in plaintext
        assert now[("pymta_outbound_tls_total", (("result", "plaintext"), ("tls_policy", "opportunistic")))] == 1, now
        assert not [k for k in now if k[0] == "pymta_outbound_connections"]  # none delivering now
    finally:
        mta.stop()
        sink.stop()
        dns.stop()


@pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed")
def test_admin_bounce_fails_matching_queued_mail_with_dsns_and_bounced_records(tmp_path):
    from pymta.admin.accounting import read_records

    dns = DNSServer(Zone({"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.8"]}})).start()
    mta, api = start_with_api(tmp_path, dns, free_port("127.0.0.8"))
    try:
        assert api.call("POST", "/api/v1/suspend", {"domain": "remote.test", "duration": "1h", "reason": "wait"})[0] == 201
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("bob@example.test", ["r1@remote.test", "r2@remote.test"], "Subject: one\r\n\r\nbody\r\n")
            client.sendmail("bob@example.test", ["r3@remote.test", "alice@example.test"], "Subject: two\r\n\r\nbody\r\n")
        mta.wait_for(lambda: len(mta.queue_files("deferred")) == 2, what="both messages held by the suspension")
        assert api.call("POST", "/api/v1/bounce", {"reason": "x"})[0] == 400
        assert api.call("POST", "/api/v1/bounce", {"domain": "remote.test"})[0] == 400
        assert api.call("POST", "/api/v1/bounce", {"domain": "remote.test", "reason": "x"}, token=READ)[0] == 403
        status, answer, _ = api.call("POST", "/api/v1/bounce", {"domain": "Remote.Test", "reason": "list\ncleaned"})
        assert status == 200, answer
        assert (answer["messages"], answer["recipients"]) == (2, 3), answer
        assert answer["reason"] == "list cleaned"
        mta.wait_for(lambda: not mta.queue_files("deferred") and not mta.queue_files("incoming"), what="the queue empty")

        def reports() -> list[bytes]:
            return [m for m in mta.maildir_messages("bob@example.test") if b"multipart/report" in m]

        mta.wait_for(lambda: len(reports()) == 2, what="two DSNs to the sender")
        dsns = reports()
        for dsn in dsns:
            assert b"5.0.0" in dsn
            assert b"administratively bounced: list cleaned" in dsn

        def recipients(event: str) -> list[str]:
            path = os.path.join(mta.state_dir, "log", "accounting.jsonl")
            return sorted(r["recipient"] for r in read_records(path) if r["event"] == event)

        assert recipients("bounced") == ["r1@remote.test", "r2@remote.test", "r3@remote.test"]
        # alice's copy, then the two notices to bob
        mta.wait_for(lambda: recipients("delivered") == ["alice@example.test", "bob@example.test", "bob@example.test"],
                     what="the delivered records")  # fmt: skip
        cli = run_cli(mta, "queue_main", "bounce", "--tenant", "nobody", "--reason", "gone")
        assert cli.returncode == 0, cli
        assert json.loads(cli.stdout)["messages"] == 0, cli
    finally:
        mta.stop()
        dns.stop()


def test_healthz_reports_listeners_and_turns_503_below_min_free(tmp_path):
    mta, api = start_with_api(tmp_path / "ok", None, 2)
    try:
        status, report, _ = api.call("GET", "/healthz", token=None)
        assert status == 200, report
        assert report["ok"] is True, report
        assert report["queue"]["deferred"] == 0, report
        listening = {entry["address"] for entry in report["listeners"] if entry["listening"]}
        assert {f"127.0.0.1:{mta.port}", f"127.0.0.1:{api.port}"} <= listening, report
    finally:
        mta.stop()
    mta, api = start_with_api(tmp_path / "full", None, 2, extra="""
        [queue]
        min_free = "1000000000GB"
        """)  # fmt: skip
    try:
        status, report, _ = api.call("GET", "/healthz", token=None)
        assert status == 503, report
        assert report["ok"] is False, report
        assert any("below min_free" in p for p in report["problems"]), report
        assert report["listeners"], report
    finally:
        mta.stop()
