"""TLS reports end to end through the real ``twistd -n pymta`` with ``[tlsrpt]`` on: a report
mailed to a report address is read by the feedback processor and listed by pymta-tlsrpt; a
report that is not JSON is kept aside; the MTA runs on."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys

import pytest

from pymta.outbound.tlsrpt import build_report, report_mail
from tests.mta_process import ROOT, MTAProcess
from tests.test_e2e_relay import queue_cli


def pymta_tlsrpt(mta: MTAProcess) -> subprocess.CompletedProcess:
    code = "import sys; from pymta.feedback.tlsrpt import tlsrpt_main; sys.exit(tlsrpt_main())"
    return subprocess.run([sys.executable, "-c", code, "--config", mta.config_path], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip

pytestmark = pytest.mark.timeout(180)


def test_a_mailed_report_is_kept_and_listed_and_a_bad_one_set_aside(tmp_path):
    mta = MTAProcess(str(tmp_path), extra_config="""
        [tlsrpt]
        enabled = true
        organization = "Example MX"
        report_addresses = ["tlsrpt@example.test"]
    """)  # fmt: skip
    rows = [("sts", '["version: STSv1"]', "mx.example.test", "192.0.2.1", "success", 12),
            ("sts", '["version: STSv1"]', "mx.example.test", "192.0.2.1", "certificate-expired", 3)]  # fmt: skip
    report = build_report("2026-11-30", "example.test", rows, "Big Mail", "ops@big.test", "r-1")
    good = report_mail(report, "example.test", "reports@big.test", ["tlsrpt@example.test"], "big.test", 1.8e9)
    try:
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.sendmail("reports@big.test", ["tlsrpt@example.test"], good)
            client.sendmail("reports@big.test", ["tlsrpt@example.test"], b"Subject: report\r\n\r\n{not json\r\n")
        bad_dir = os.path.join(mta.state_dir, "tlsrpt-bad")
        mta.wait_for(lambda: os.path.isdir(bad_dir) and os.listdir(bad_dir), what="the bad report kept aside")

        def listed():
            out = pymta_tlsrpt(mta)
            return out if "Big Mail" in out.stdout else None

        out = queue_cli(mta, "list")  # the MTA still answers
        assert out.returncode == 0, out.stderr
        shown = mta.wait_for(listed, what="pymta-tlsrpt listing the report")
        assert "2026-11-30  Big Mail: 12 successful, failed: certificate-expired 3" in shown.stdout
        assert [e for e in mta.log_events() if e.get("event") == "tlsrpt_bad"]
    finally:
        mta.stop()
