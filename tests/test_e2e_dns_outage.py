"""End to end: with DNS blackholed (a loopback UDP socket that never answers), relay mail waits
on its lookups while local mail is still accepted and delivered; the lookups run on their own
thread pool, so none of them stands between a message and its 250."""

from __future__ import annotations

import signal
import smtplib
import socket
import time

import pytest

from tests.mta_process import MTAProcess, wait_until

pytestmark = pytest.mark.timeout(180)

RELAYED = 40  # more lookups in flight than the DNS pool has threads


def test_local_mail_is_accepted_and_delivered_while_every_dns_lookup_hangs(tmp_path):
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives queries, never answers
    blackhole.bind(("127.0.0.1", 0))
    dns = f"127.0.0.1:{blackhole.getsockname()[1]}"
    config = f'[dns]\nservers = ["{dns}"]\ntimeout = "10s"\n[queue]\nshutdown_grace = "2s"\n'
    mta = MTAProcess(str(tmp_path), extra_config=config)
    try:
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            for i in range(RELAYED):
                client.sendmail("s@example.org", [f"r@remote{i}.test"], f"Subject: relay {i}\r\n\r\nbody\r\n")
        blackhole.settimeout(10)
        blackhole.recv(512)  # the lookups have started (and will not be answered)
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("s@example.org", ["alice@example.test"], "Subject: local\r\n\r\nbody\r\n")
        wait_until(lambda: mta.maildir_messages("alice@example.test"), 60, "local delivery")
        order = [(e["event"], e.get("rcpt") or ",".join(e.get("recipients") or []))
                 for e in mta.log_events() if e.get("event") in ("queued", "delivered", "deferred")]  # fmt: skip
        # Local mail was acknowledged and delivered while every relay lookup still hung (no
        # relay recipient has an outcome yet: none of them was deferred).
        assert order == [("queued", f"r@remote{i}.test") for i in range(RELAYED)] + [
            ("queued", "alice@example.test"), ("delivered", "alice@example.test")]

        # Hung lookups do not hold up a stop either (the DNS threads are not waited for).
        started = time.monotonic()
        mta.proc.send_signal(signal.SIGTERM)
        mta.proc.wait(2 + 5 + 2)
        assert time.monotonic() - started < 2 + 5
    finally:
        mta.stop()
        blackhole.close()
