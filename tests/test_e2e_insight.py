"""The dashboard's numbers through the real ``twistd pymta`` with listener workers: mail accepted
by a worker is counted as received in the time series, and the webhook backlog is plotted."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import urllib.request

import pytest

from pymta.admin.http.tokens import digest
from tests.mta_process import MTAProcess, free_port, wait_for_port

pytestmark = pytest.mark.timeout(180)

READ = "read-token-0123456789abcdefghijklmnopqr"


def _get(port: int, path: str) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {READ}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def _backlog(port: int) -> int:
    return json.loads(_get(port, "/api/v1/webhooks"))["webhooks"][0]["backlog"]


def test_worker_accepted_mail_is_received_in_the_series_and_the_webhook_backlog_is_plotted(tmp_path):
    tokens = tmp_path / "api-tokens"
    tokens.write_text(f"dash:read:{digest(READ)}\n")
    api_port, dead_port = free_port(), free_port()  # nothing listens on dead_port: events wait
    mta = MTAProcess(str(tmp_path), smtp_extra="processes = 2", extra_config=f"""
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        tokens_file = "{tokens}"
        [[webhooks]]
        name = "crm"
        url = "http://127.0.0.1:{dead_port}/hook"
        secret = "insight-secret-0123456789"
        events = ["delivered"]
        retry_initial = "30s"
        """).start()  # fmt: skip
    try:
        wait_for_port("127.0.0.1", api_port, 30)
        mta.wait_for(lambda: len(mta.children()) == 1, what="one listener worker")

        def worker_greets() -> bool:  # started, not only spawned: a stopped main process cannot help it start
            try:
                with socket.create_connection(("127.0.0.1", mta.port), timeout=5) as sock:
                    return sock.recv(512).startswith(b"220 ")
            except OSError:
                return False

        mta.wait_for(worker_greets, what="the listener worker's greeting")
        os.kill(mta.proc.pid, signal.SIGSTOP)  # only the worker can accept now
        try:
            for i in range(3):
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
                    client.sendmail("s@example.org", ["bob@example.test", "alice@example.test"],
                                    f"Subject: w{i}\r\n\r\nx\r\n")  # fmt: skip
        finally:
            os.kill(mta.proc.pid, signal.SIGCONT)
        mta.wait_for(lambda: len(mta.maildir_messages("alice@example.test")) == 3, what="the deliveries")
        backlog = mta.wait_for(lambda: (n := _backlog(api_port)) >= 6 and n, what="six delivered events waiting")
        html = _get(api_port, "/?range=hour").decode()
        # 3 messages of 2 recipients each, accepted by the worker only: 6 received recipients.
        assert re.search(r'data-total="received">6<', html), html[:3000]
        assert re.search(r'data-total="delivered">6<', html)
        chart = re.search(r'<svg[^>]*aria-label="webhook backlog".*?</svg>', html)
        assert chart, "no webhook backlog chart"
        values = [float(v) for v in re.findall(r'data-series="events"[^>]*data-v="([0-9.]+)"', chart.group(0))]
        assert values, (values, backlog)
        assert values[-1] == backlog == _backlog(api_port), (values, backlog)
    finally:
        mta.stop()
