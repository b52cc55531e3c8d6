"""A real milter: Debian's clamav-milter with clamd on loopback (a one-signature database made here,
since the official signatures need the network), in front of the real twistd."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time

import pytest

from tests.mta_process import MTAProcess, free_port

pytestmark = pytest.mark.timeout(180)

MARKER = b"PYMTA-TEST-VIRUS-MARKER-7d3f"


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {seconds}s")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def clamav_milter():
    clamd, milter = shutil.which("clamd") or "/usr/sbin/clamd", shutil.which("clamav-milter") or "/usr/sbin/clamav-milter"
    if not (os.path.exists(clamd) and os.path.exists(milter)):
        pytest.skip("needs Debian's clamav-daemon and clamav-milter")
    d = tempfile.mkdtemp(prefix="pymta-clamav-")
    os.mkdir(os.path.join(d, "db"))
    with open(os.path.join(d, "db", "pymta.ndb"), "w") as f:
        f.write(f"PymtaTest.Marker:0:*:{MARKER.hex()}\n")
    port = free_port()
    with open(os.path.join(d, "clamd.conf"), "w") as f:
        f.write(f"LocalSocket {d}/clamd.sock\nDatabaseDirectory {d}/db\nForeground yes\nLogFile {d}/clamd.log\n"
                f"TemporaryDirectory {d}\n")  # fmt: skip
    with open(os.path.join(d, "milter.conf"), "w") as f:
        f.write(f"MilterSocket inet:{port}@127.0.0.1\nClamdSocket unix:{d}/clamd.sock\nOnInfected Reject\n"
                f"OnFail Defer\nAddHeader Replace\nForeground yes\nLogFile {d}/milter.log\nTemporaryDirectory {d}\n")  # fmt: skip
    procs = [subprocess.Popen([clamd, "-c", f"{d}/clamd.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: os.path.exists(f"{d}/clamd.sock"), 60, "clamd")
        procs.append(subprocess.Popen([milter, "-c", f"{d}/milter.conf"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))  # fmt: skip
        wait_until(lambda: listening(port), 60, "clamav-milter")
        yield port
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(d, True)


def test_clamav_milter_passes_clean_mail_with_its_headers_and_rejects_a_virus(tmp_path, clamav_milter):
    mta = MTAProcess(str(tmp_path), extra_config=f"""
        [scan]
        timeout = "30s"
        [[scan.milter]]
        socket = "inet:127.0.0.1:{clamav_milter}"
        """).start()  # fmt: skip
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=60) as client:
            client.ehlo("client.remote.test")
            client.mail("s@remote.test")
            client.rcpt("alice@example.test")
            assert client.data(b"Subject: clean\r\n\r\nhello\r\n")[0] == 250
            client.mail("s@remote.test")
            client.rcpt("alice@example.test")
            code, text = client.data(b"Subject: infected\r\n\r\n" + MARKER + b"\r\n")
            assert (code, text[:5]) == (550, b"5.7.1")
        [message] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="the clean message")
        assert b"Subject: clean" in message
        assert b"X-Virus-Status: Clean" in message
        assert b"X-Virus-Scanned: clamav-milter" in message
    finally:
        mta.stop()
