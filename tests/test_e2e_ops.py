"""pymta-queue against the real ``twistd -n pymta``: a dead-site suspension is explained by
``shaping DOMAIN`` and lifted by ``flush --domain DOMAIN``, which delivers the mail at once."""

from __future__ import annotations

import json
import os
import smtplib

import pytest

from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port
from tests.test_e2e_relay import Sink, run_cli

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed"),
]


def test_flush_domain_lifts_a_dead_site_suspension_and_delivers_now(tmp_path):
    port = free_port("127.0.0.8")
    dns = DNSServer(Zone({
        "later.test": {"MX": ["10 mx.later.test."]}, "mx.later.test": {"A": ["127.0.0.8"]},
        "other.test": {"MX": ["10 mx.other.test."]}, "mx.other.test": {"A": ["127.0.0.9"]},
    })).start()  # fmt: skip
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port).start()
    sink = None
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            for n in range(6):  # nothing listens at mx.later.test: five failures suspend it
                client.sendmail("s@example.org", [f"r{n}@later.test"], f"Subject: {n}\r\n\r\nbody\r\n")
            client.sendmail("s@example.org", ["x@other.test"], "Subject: other\r\n\r\nbody\r\n")

        def later_state():
            answer = run_cli(mta, "queue_main", "shaping", "later.test")
            assert answer.returncode == 0, answer.stderr
            destinations = json.loads(answer.stdout)["destinations"]
            return destinations if destinations and destinations[0]["reason"].startswith("dead site") else None

        [later] = mta.wait_for(later_state, what="dead-site suspension of later.test")
        assert later["key"] == "mx:mx.later.test"
        assert later["paused_until"] > 0
        sink = Sink("127.0.0.8", port)
        flushed = run_cli(mta, "queue_main", "flush", "--domain", "later.test")
        assert flushed.returncode == 0, flushed.stderr
        answer = json.loads(flushed.stdout)
        assert answer["resumed"] == ["mx:mx.later.test"]
        assert answer["domain"] == "later.test"
        mta.wait_for(lambda: len(sink.messages()) == 6, what="every message for later.test delivered after the flush")
        assert run_cli(mta, "queue_main", "shaping", "later.test").returncode == 0
        listing = json.loads(run_cli(mta, "queue_main", "--json", "list").stdout)
        assert [r["address"] for m in listing for r in m["recipients"]] == ["x@other.test"]  # not flushed away
    finally:
        mta.stop()
        if sink is not None:
            sink.stop()
        dns.stop()
