"""Aliases, virtual maps, SRS, the recipient delimiter and quotas through the real ``twistd -n pymta``
on loopback, from a client that may not relay, with Debian's smtp-sink as the remote hosts."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys

import pytest

from pymta.admin.http.tokens import digest
from tests.mta_process import ROOT, MTAProcess, free_port, wait_for_port
from tests.test_e2e_relay import Sink
from tests.test_http_api import INJECT, Client

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/smtp-sink"), reason="smtp-sink (Debian postfix) not installed"),
]

SECRET = "srs-secret-for-the-e2e-test"


def message(subject: str, size: int = 0) -> bytes:
    return f"From: bob@origin.test\r\nSubject: {subject}\r\n\r\n{'x' * size}\r\nbody\r\n".encode()


@pytest.fixture
def mta(tmp_path):
    sink_port, api_port = free_port(), free_port()
    sink = Sink("127.0.0.1", sink_port)
    (tmp_path / "api-tokens").write_text(f"crm:inject:{digest(INJECT)}\n")
    (tmp_path / "aliases").write_text("sales: alice, dave@remote.test\nloop1: loop2\nloop2: loop1\n")
    mta = MTAProcess(str(tmp_path), relay_from="192.0.2.0/24", extra_config=f"""
        [aliases]
        file = "{tmp_path}/aliases"
        [srs]
        secret = "{SECRET}"
        [virtual]
        "@old.example.test" = ["alice@example.test"]
        [mailbox]
        delimiter_folders = true
        quotas = {{ "bob@example.test" = "1KB" }}
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        tokens_file = "{tmp_path}/api-tokens"
        [routes]
        "remote.test" = "127.0.0.1:{sink_port}"
        "origin.test" = "127.0.0.1:{sink_port}"
        """)  # fmt: skip
    with open(mta.config_path) as f:
        text = f.read()
    with open(mta.config_path, "w") as f:  # the key belongs in the [domains] table MTAProcess writes
        f.write(text.replace('relay_from = ["192.0.2.0/24"]', 'relay_from = ["192.0.2.0/24"]\nrecipient_delimiter = "+"'))
    mta.start()
    wait_for_port("127.0.0.1", api_port, 30)
    mta.api = Client(api_port)
    yield mta, sink
    mta.stop()
    sink.stop()


def send(mta: MTAProcess, sender: str, rcpts: list[str], data: bytes, size: int | None = None) -> list[tuple[int, bytes]]:
    """The RCPT replies, then the DATA reply when some recipient was accepted."""
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail(sender, [f"SIZE={size}"] if size else [])[0] == 250
        replies = [client.rcpt(r) for r in rcpts]
        if any(code == 250 for code, _ in replies):
            replies.append(client.data(data))
        return replies


def test_an_alias_delivers_locally_and_forwards_with_srs_and_the_bounce_comes_back(mta):
    mta, sink = mta
    replies = send(mta, "bob@origin.test", ["sales@example.test", "anyone@old.example.test"], message("to sales"))
    assert [code for code, _ in replies] == [250, 250, 250], replies
    local = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="local delivery")
    assert b"X-Original-To: sales@example.test\n" in local[0]
    assert b"Delivered-To: alice@example.test\n" in local[0]
    [forwarded] = mta.wait_for(lambda: sink.messages(), what="the forwarded copy")
    mail_from = re.search(rb"X-Mail-Args: <([^>]*)>", forwarded).group(1).decode()
    assert re.fullmatch(r"SRS0=[^=]{8}=[A-Z2-7]{2}=origin\.test=bob@mx\.example\.test", mail_from), mail_from
    assert b"X-Rcpt-Args: <dave@remote.test>" in forwarded
    # the remote host bounces to the SRS address: accepted from anyone, delivered to the original sender
    replies = send(mta, "", [mail_from], message("bounce"))
    assert [code for code, _ in replies] == [250, 250]
    bounce = mta.wait_for(lambda: [m for m in sink.messages() if b"Subject: bounce" in m], what="the reversed bounce")
    assert b"X-Rcpt-Args: <bob@origin.test>" in bounce[0]
    assert b"X-Mail-Args: <>" in bounce[0]
    forged = mail_from.replace("=origin.test=", "=victim.test=")
    [(code, text)] = send(mta, "", [forged], message("forged"))
    assert (code, text[:5]) == (550, b"5.7.1")


def test_a_loop_is_refused_546_an_extension_lands_in_its_folder_and_sighup_reloads(mta, tmp_path):
    mta, _ = mta
    [(code, text)] = send(mta, "bob@origin.test", ["loop1@example.test"], message("loop"))
    assert (code, text[:5]) == (550, b"5.4.6")
    assert [c for c, _ in send(mta, "bob@origin.test", ["alice+News@example.test"], message("tagged"))] == [250, 250]
    folder = os.path.join(mta.state_dir, "mail", "example.test", "alice", ".news", "new")
    mta.wait_for(lambda: os.path.isdir(folder) and os.listdir(folder), what="delivery into the .news folder")
    [(code, _)] = send(mta, "bob@origin.test", ["newname@example.test"], message("x"))
    assert code == 550
    (tmp_path / "aliases").write_text("newname: alice\n")
    with open(mta.config_path) as f:
        config = f.read()
    with open(mta.config_path, "w") as f:  # [virtual] is read again from the configuration file too
        f.write(config.replace('"@old.example.test" = ["alice@example.test"]', '"info@example.test" = "alice@example.test"'))
    mta.proc.send_signal(signal.SIGHUP)
    mta.wait_for(lambda: any(e.get("event") == "tables_reloaded" for e in mta.log_events()), what="the reload")
    replies = send(mta, "bob@origin.test", ["newname@example.test", "info@example.test", "x@old.example.test"], message("x"))
    assert [c for c, _ in replies] == [250, 250, 550, 250]
    (tmp_path / "aliases").write_text("broken line\n")  # a broken file keeps the tables in use
    mta.proc.send_signal(signal.SIGHUP)
    mta.wait_for(lambda: any(e.get("event") == "tables_reload_failed" for e in mta.log_events()), what="the refusal")
    assert [c for c, _ in send(mta, "bob@origin.test", ["newname@example.test"], message("x"))] == [250, 250]
    assert mta.proc.poll() is None


def test_a_mailbox_over_quota_defers_and_then_answers_452_at_rcpt(mta):
    mta, _ = mta
    assert [c for c, _ in send(mta, "bob@origin.test", ["bob@example.test"], message("small", 100))] == [250, 250]
    mta.wait_for(lambda: mta.maildir_messages("bob@example.test"), what="the first delivery")
    assert [c for c, _ in send(mta, "bob@origin.test", ["bob@example.test"], message("big", 900))] == [250, 250]
    over = mta.wait_for(lambda: [e for e in mta.log_events() if e.get("event") == "over_quota"], what="the deferral")
    assert (over[0]["code"], over[0]["enhanced"]) == (452, "4.2.2")
    assert len(mta.maildir_messages("bob@example.test")) == 1
    [(code, text)] = send(mta, "bob@origin.test", ["bob@example.test"], message("sized"), size=1000)
    assert (code, text[:5]) == (452, b"4.2.2")


def test_pymta_map_prints_the_expansion(mta):
    mta, _ = mta
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "pymta.admin.maps", "--config", mta.config_path, "test",
                          "sales@example.test", "loop1@example.test", "--sender", "bob@origin.test"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == ["sales@example.test:", "  alice@example.test  local"]
    assert re.fullmatch(r"  dave@remote\.test  relay \(forwarded; sender SRS0=.*=origin\.test=bob@mx\.example\.test\)", lines[2])
    assert lines[3] == "loop1@example.test: refused 550 5.4.6 Alias expansion loop"


def test_a_malformed_aliases_file_stops_startup_with_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "aliases").write_text("sales: alice\n\nteam |/usr/bin/procmail\n")
    mta = MTAProcess(str(tmp_path), extra_config=f'[aliases]\nfile = "{tmp_path}/aliases"\n')
    with pytest.raises(RuntimeError, match="exited"):
        mta.start()
    mta.stop()
    with open(os.path.join(str(tmp_path), "twistd.stderr")) as f:
        errors = [line for line in f.read().splitlines() if line.strip()]
    assert errors == [f'pymta: configuration error: {tmp_path}/aliases:3: expected "name: target, target", '
                      "got 'team |/usr/bin/procmail'"]  # fmt: skip


def test_injection_to_an_alias_reaches_every_member_as_over_smtp(mta):
    mta, sink = mta
    status, body, _ = mta.api.call("POST", "/api/v1/inject", {
        "envelope_sender": "news@origin.test", "recipients": ["sales@example.test", "loop1@example.test"],
        "content": "Subject: injected\n\nbody\n"}, token=INJECT)  # fmt: skip
    assert status == 200, body
    assert body["success_count"] == 1, body
    assert body["failed_recipients"] == [{"email": "loop1@example.test", "reason": "5.4.6 Alias expansion loop"}]
    local = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="local delivery")
    assert b"Subject: injected" in local[0]
    assert b"X-Original-To: sales@example.test" in local[0]
    [forwarded] = mta.wait_for(lambda: sink.messages(), what="the forwarded copy")
    assert re.search(rb"X-Mail-Args: <SRS0=[^>]*=origin\.test=news@mx\.example\.test>", forwarded)


def catches_sighup(pid: int) -> bool:
    """The process has its SIGHUP handler installed (SigCgt in /proc), i.e. it has started its services."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


def test_sighup_reloads_the_tables_in_the_listener_workers_too(tmp_path):
    (tmp_path / "aliases").write_text("old: alice\n")
    mta = MTAProcess(str(tmp_path), smtp_extra="processes = 2",
                     extra_config=f'[aliases]\nfile = "{tmp_path}/aliases"\n').start()  # fmt: skip
    try:
        [worker] = mta.wait_for(lambda: mta.children(), what="the listener worker")
        mta.wait_for(lambda: catches_sighup(worker), what="the worker's SIGHUP handler")
        (tmp_path / "aliases").write_text("new: alice\n")
        mta.proc.send_signal(signal.SIGHUP)
        mta.wait_for(lambda: sum(e.get("event") == "tables_reloaded" for e in mta.log_events()) == 2,
                     what="both processes reloaded")  # one JSON log for both: one event each
        for _ in range(8):  # the kernel spreads connections over both processes
            [(code, _), (data_code, _)] = send(mta, "bob@origin.test", ["new@example.test"], message("new"))
            assert (code, data_code) == (250, 250)
    finally:
        mta.stop()
