"""The accounting log of the real ``twistd -n pymta``: complete after ``kill -9`` under load, and
reopened on SIGUSR1 / SIGHUP for logrotate."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import threading

import pytest

from pymta.admin.accounting import read_records
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port
from tests.test_e2e_relay import Sink, run_cli

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed"),
]


def accounting(mta: MTAProcess, name: str = "accounting.jsonl") -> list[dict]:
    path = os.path.join(mta.state_dir, "log", name)
    return list(read_records(path)) if os.path.exists(path) else []


def queued_qids(mta: MTAProcess) -> set[str]:
    """Every queue id still in the queue of the stopped MTA (through pymta-queue, whatever the file format)."""
    listing = run_cli(mta, "queue_main", "--json", "list")
    assert listing.returncode == 0, listing.stderr
    return {m["qid"] for m in json.loads(listing.stdout)}


def test_after_kill_9_under_load_every_acknowledged_and_every_delivered_message_has_its_record(tmp_path):
    port = free_port("127.0.0.7")
    dns = DNSServer(Zone({"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.7"]}})).start()
    sink = Sink("127.0.0.7", port)
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port).start()
    acked: dict[int, str] = {}  # X-Seq -> queue id, for every 250 the clients got
    lock = threading.Lock()
    stop = threading.Event()

    def client(first: int) -> None:
        for seq in range(first, first + 1000, 1):
            if stop.is_set():
                return
            message = f"From: s@example.org\r\nTo: r@remote.test\r\nX-Seq: {seq}\r\nSubject: load\r\n\r\n{seq}\r\nbody\r\n"
            try:
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as smtp:
                    smtp.ehlo()
                    smtp.mail("s@example.org")
                    smtp.rcpt("r@remote.test")
                    code, text = smtp.data(message.encode())
            except (OSError, smtplib.SMTPException):
                return  # the MTA was killed under us
            if code == 250:
                with lock:
                    acked[seq] = text.decode().rsplit(" ", 1)[-1]

    try:
        threads = [threading.Thread(target=client, args=(n * 1000,)) for n in range(4)]
        for t in threads:
            t.start()
        mta.wait_for(lambda: len(acked) >= 40 and len(sink.messages()) >= 10, seconds=120, what="load")
        mta.proc.send_signal(signal.SIGKILL)  # in the middle of receiving and delivering
        mta.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        mta.stop()
        records = accounting(mta)
        received = {r["qid"] for r in records if r["event"] == "received"}
        delivered = {r["qid"] for r in records if r["event"] == "delivered"}
        queued = queued_qids(mta)
        # Received records are the queue manager's to write at a message's first attempt: one
        # acknowledged but not yet attempted is still queued, its file standing for them.
        assert set(acked.values()) <= received | queued, "acknowledged, neither recorded nor queued"
        # A message that left the queue has its delivered record (the record went to disk first).
        assert set(acked.values()) - queued <= delivered
        # A message the sink has is either recorded as delivered or still queued (delivered again later).
        at_sink = [int(m.split(b"X-Seq: ", 1)[1].split(b"\n", 1)[0]) for m in sink.messages()]
        unrecorded = {acked[seq] for seq in at_sink if seq in acked} - delivered
        assert unrecorded <= queued
        # After a restart everything acknowledged is delivered and recorded.
        mta.start()
        mta.wait_for(lambda: set(acked.values()) <= {r["qid"] for r in accounting(mta) if r["event"] == "delivered"},
                     seconds=120, what="every acknowledged message delivered after the restart")  # fmt: skip
        assert {seq for seq in (int(m.split(b"X-Seq: ", 1)[1].split(b"\n", 1)[0]) for m in sink.messages())} >= set(acked)
        # Every acknowledged message has its received record now; only one queued at the kill may
        # have two (written before the kill, and again at its attempt after the restart).
        counts: dict[str, int] = {}
        for r in accounting(mta):
            if r["event"] == "received":
                counts[r["qid"]] = counts.get(r["qid"], 0) + 1
        assert set(acked.values()) <= set(counts)
        assert {qid for qid, n in counts.items() if n > 1} <= queued
    finally:
        stop.set()
        mta.stop()
        sink.stop()
        dns.stop()


@pytest.mark.parametrize(("sig", "processes"), [(signal.SIGUSR1, 1), (signal.SIGHUP, 1), (signal.SIGUSR1, 2)],
                         ids=["SIGUSR1", "SIGHUP", "SIGUSR1-with-a-listener-worker"])  # fmt: skip
def test_a_signal_reopens_the_accounting_log_and_the_log_file_after_logrotate_renamed_them(tmp_path, sig, processes):
    mta = MTAProcess(str(tmp_path), smtp_extra=f"processes = {processes}").start()
    log_dir = os.path.join(mta.state_dir, "log")
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as smtp:
            smtp.sendmail("s@example.org", ["alice@example.test"], "Subject: one\r\n\r\nfirst\r\n")
        mta.wait_for(lambda: any(r["event"] == "delivered" for r in accounting(mta)), what="first delivery")
        # Every listener worker listens (its signal handlers are installed before its port starts); with
        # workers, the main process delivers and does not accept.
        mta.wait_for(lambda: len([e for e in mta.log_events() if e["message"].startswith(
            f"SMTPServerFactory starting on {mta.port}")]) == max(1, processes - 1), what="listeners ready")  # fmt: skip
        os.rename(os.path.join(log_dir, "accounting.jsonl"), os.path.join(log_dir, "accounting.jsonl.1"))
        os.rename(mta.log_path, mta.log_path + ".1")
        mta.proc.send_signal(sig)
        # Every process (the main one and each listener worker) reopens both files.
        mta.wait_for(lambda: os.path.exists(mta.log_path) and len(
            [e for e in mta.log_events() if e.get("event") == "log_reopen"]) == processes, what="log files reopened")  # fmt: skip
        for n in range(6):  # spread over the processes that accept
            with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as smtp:
                smtp.sendmail("s@example.org", ["bob@example.test"], f"Subject: {n}\r\n\r\nsecond\r\n")
        records = mta.wait_for(lambda: (r := [r for r in accounting(mta) if r["event"] == "delivered"]) and len(r) == 6
                               and r, what="later deliveries")  # fmt: skip
        assert {r["recipient"] for r in records} == {"bob@example.test"}
        assert len([r for r in accounting(mta) if r["event"] == "received"]) == 6
        old = list(read_records(os.path.join(log_dir, "accounting.jsonl.1")))
        assert [(r["event"], r["recipient"]) for r in old] == [("received", "alice@example.test"),
                                                                ("delivered", "alice@example.test")]  # fmt: skip
        assert len([e for e in mta.log_events() if e.get("event") == "queued"]) == 6  # all in the new log file
        assert mta.proc.poll() is None
    finally:
        mta.stop()
