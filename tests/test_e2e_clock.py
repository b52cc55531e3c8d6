"""The real ``twistd -n pymta`` under libfaketime (Debian ``libfaketime``): the wall clock steps
back two hours or forward a day while mail waits for a retry; the retry comes on time, and no
delay notice or expiry is fired by the step."""

from __future__ import annotations

import glob
import json
import os
import smtplib

import pytest

from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port
from tests.test_e2e_relay import Sink, run_cli

FAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")), "")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed"),
    pytest.mark.skipif(not os.path.exists(FAKETIME), reason="libfaketime (Debian libfaketime) not installed"),
]


def attempts(mta: MTAProcess) -> list[dict]:
    path = os.path.join(mta.state_dir, "log", "accounting.jsonl")
    if not os.path.exists(path):
        return []
    return [r for r in map(json.loads, open(path).read().splitlines()) if r["event"] in ("deferred", "delivered")]


@pytest.mark.parametrize("step", ["-2h", "+1d"])
def test_a_wall_clock_step_neither_delays_the_retry_nor_fires_notices(tmp_path, step):
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    port = free_port("127.0.0.8")
    dns = DNSServer(Zone({"later.test": {"MX": ["10 mx.later.test."]}, "mx.later.test": {"A": ["127.0.0.8"]}})).start()
    env = {"LD_PRELOAD": FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port, env=env, extra_config="""
        [queue]
        retry_initial = "6s"
        retry_max = "6s"
        delay_warning = "1h"
        max_age = "12h"
        """).start()  # fmt: skip
    sink = None
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("alice@example.test", ["x@later.test"], "Subject: wait\r\n\r\nbody\r\n")
        mta.wait_for(lambda: attempts(mta), what="first attempt deferred (nothing listens yet)")
        offset.write_text(step + "\n")  # NTP steps the clock
        if step == "-2h":
            sink = Sink("127.0.0.8", port)
            mta.wait_for(sink.messages, seconds=60, what="the retry after the step back (not two hours later)")
        else:
            mta.wait_for(lambda: len(attempts(mta)) >= 2, seconds=60, what="the retry after the step forward")
            assert mta.maildir_messages("alice@example.test") == []  # no delay notice, no bounce for expiry
            listing = json.loads(run_cli(mta, "queue_main", "--json", "list").stdout)
            assert [m["recipients"][0]["state"] for m in listing] == ["deferred"]
    finally:
        mta.stop()
        if sink is not None:
            sink.stop()
        dns.stop()
