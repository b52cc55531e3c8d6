"""pymta-suppress and pymta-queue (on a stopped MTA's queue directory) as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module_main: str, config: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    code = f"import sys; from pymta.admin.cli import {module_main}; sys.exit({module_main}())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", config, *args],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "pymta.toml"
    path.write_text(f'state_dir = "{tmp_path / "var"}"\n[domains]\nlocal = ["example.test"]\n')
    return str(path)


def test_suppress_add_list_export_remove_import(config, tmp_path):
    assert run("suppress_main", config, "add", "Carol@Remote.Example", "--reason", "asked").returncode == 0
    listing = run("suppress_main", config, "list").stdout
    assert "carol@remote.example\tglobal\tmanual\tasked" in listing
    exported = run("suppress_main", config, "export").stdout
    assert exported.splitlines()[0].startswith("address,scope,reason")
    assert run("suppress_main", config, "remove", "carol@remote.example").returncode == 0
    assert run("suppress_main", config, "list").stdout == ""
    proc = run("suppress_main", config, "remove", "carol@remote.example")
    assert proc.returncode == 1
    assert "not suppressed" in proc.stderr
    assert run("suppress_main", config, "import", "-", stdin=exported).returncode == 0
    assert "carol@remote.example" in run("suppress_main", config, "list").stdout
    bad = run("suppress_main", config, "import", "-", stdin="email\nx@y\n")
    assert bad.returncode == 1
    assert "address" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_suppress_reports_a_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("nonsense = 1\n")
    proc = run("suppress_main", str(path), "list")
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"pymta-suppress: configuration error: {path}: nonsense: unknown key (known: ")
    assert "smtp" in line
    assert "Traceback" not in proc.stderr


_QUEUE_ONE = """
import sys
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool
from pymta.envelope import Envelope, Recipient, new_qid
from pymta.queue.store import MaildirQueueStore

@defer.inlineCallbacks
def main(reactor, queue_dir, flagged):
    pool = ThreadPool(1, 2)
    pool.start()
    try:
        store = MaildirQueueStore(queue_dir, reactor=reactor, threadpool=pool)
        store.recover()
        extra = {"received_at_pickup": True} if flagged == "flagged" else {}
        env = Envelope(qid=new_qid(), sender="someone@example.org", recipients=[Recipient("carol@remote.example")],
                       extra=extra)
        qid = yield store.enqueue(env, b"Subject: q\\r\\n\\r\\nbody\\r\\n")
        print(qid)
    finally:
        pool.stop()

task.react(main, sys.argv[1:])
"""


def _queue_one(queue_dir: str, flagged: bool = False) -> str:
    """Queue a message the way the MTA does, through the store, in a process of its own; ``flagged``:
    as a process that leaves its received records to the queue manager's pickup does."""
    argv = [sys.executable, "-c", _QUEUE_ONE, queue_dir, "flagged" if flagged else "-"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_queue_commands_work_on_a_stopped_mta(config, tmp_path):
    queue_dir = str(tmp_path / "var" / "queue")
    assert "Mail queue is empty" in run("queue_main", config, "list").stdout or not os.path.isdir(queue_dir)
    qid = _queue_one(queue_dir)
    listing = run("queue_main", config, "list")
    assert listing.returncode == 0, listing.stderr
    assert qid in listing.stdout
    assert "carol@remote.example [pending]" in listing.stdout
    shown = json.loads(run("queue_main", config, "show", qid).stdout)
    assert shown["sender"] == "someone@example.org"
    assert "Subject: q" in shown["headers"]
    assert run("queue_main", config, "hold", qid).returncode == 0
    assert os.listdir(os.path.join(queue_dir, "hold")) == [qid]
    assert run("queue_main", config, "release", qid).returncode == 0
    assert os.listdir(os.path.join(queue_dir, "incoming")) == [qid]
    flush = run("queue_main", config, "flush")
    assert flush.returncode == 1
    assert "running MTA" in flush.stderr
    missing = run("queue_main", config, "show", "0" * 20)
    assert missing.returncode == 1
    assert "no message" in missing.stderr
    assert run("queue_main", config, "delete", "all").returncode == 0
    assert run("queue_main", config, "list").stdout.startswith("Mail queue is empty")
    assert [name for _dir, _subdirs, names in os.walk(queue_dir) for name in names] == []


def test_deleting_a_message_never_picked_up_writes_the_received_records_it_owes_first(config, tmp_path):
    from pymta.admin.accounting import read_records

    queue_dir = str(tmp_path / "var" / "queue")
    owing = _queue_one(queue_dir, flagged=True)
    written = _queue_one(queue_dir)  # its records were written before its 250
    accounting = tmp_path / "var" / "log" / "accounting.jsonl"
    accounting.parent.mkdir(parents=True, exist_ok=True)
    accounting.mkdir()  # cannot be written: the delete is refused, the message kept
    refused = run("queue_main", config, "delete", owing)
    assert refused.returncode == 1
    assert f"nothing deleted: cannot open the accounting log {accounting}: Is a directory" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert owing in run("queue_main", config, "list").stdout
    accounting.rmdir()
    assert run("queue_main", config, "hold", owing).returncode == 0  # held, still owing
    assert run("queue_main", config, "delete", "all").returncode == 0
    got = list(read_records(str(accounting)))
    assert [(r["event"], r["qid"], r["recipient"], r["sender"]) for r in got] == [
        ("received", owing, "carol@remote.example", "someone@example.org")
    ]
    assert written not in run("queue_main", config, "list").stdout


def test_queue_list_and_show_read_a_queue_left_by_the_previous_release(config, tmp_path):
    queue_dir = tmp_path / "var" / "queue"
    for sub in ("data", "deferred"):
        (queue_dir / sub).mkdir(parents=True)
    qid = "0" * 19 + "1"
    envelope = {"qid": qid, "sender": "old@example.org", "recipients": [{"address": "dave@remote.example"}]}
    (queue_dir / "deferred" / qid).write_text(json.dumps(envelope))
    (queue_dir / "data" / qid).write_bytes(b"Subject: from before\r\n\r\nbody\r\n")
    listing = run("queue_main", config, "list")
    assert listing.returncode == 0, listing.stderr
    assert qid in listing.stdout
    assert "dave@remote.example [pending]" in listing.stdout
    shown = json.loads(run("queue_main", config, "show", qid).stdout)
    assert shown["state"] == "deferred"
    assert "Subject: from before" in shown["headers"]
    assert not (queue_dir / "data").exists()
    (queue_dir / "corrupt" / ("0" * 19 + "2")).write_bytes(b"PYMTAQ1\ntorn")
    assert run("queue_main", config, "list").stdout.endswith("-- 2 message(s), 1 quarantined in corrupt/\n")
