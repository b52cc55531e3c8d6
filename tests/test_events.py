"""The event journal and the webhook senders on ``task.Clock``: durability before emission,
recovery after a torn write, in-order at-least-once delivery with backoff, drops with a record."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
from types import SimpleNamespace

from twisted.internet import defer, error, task

from pymta.config import ConfigError, build_config
from pymta.events.emit import AccountingEvents
from pymta.events.journal import EventJournal
from pymta.events.webhooks import WebhookSender, sign, verify

SECRET = b"webhook-secret-0123456789"


def hook(**kw):
    values = dict(name="crm", url="http://127.0.0.1:1/e", secret=SECRET.decode(), secret_file=None, events=None,
                  batch_size=2, linger=0.0, timeout=5.0, max_age=3600.0, retry_initial=1.0, retry_max=60.0)  # fmt: skip
    values.update(kw)
    return SimpleNamespace(**values)


def journal_at(tmp_path, clock):
    return EventJournal(str(tmp_path / "journal"), clock)


def test_an_event_counts_as_emitted_only_once_it_is_fsynced(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    journal.emit("delivered", qid="Q1", recipient="a@b.example", reply=None)
    done = journal.synced()
    assert not done.called
    assert journal.durable_seq == 0
    assert journal.read(0, 10) == []  # readers see nothing that is not durable
    clock.advance(0)
    assert done.called
    assert journal.durable_seq == 1
    [record] = journal.read(0, 10)
    assert record["type"] == "delivered"
    assert record["qid"] == "Q1"
    assert "reply" not in record
    assert len(record["event_id"]) == 32
    assert record["seq"] == 1


def test_restart_continues_the_sequence_and_cuts_a_torn_last_record(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    for i in range(3):
        journal.emit("delivered", qid=f"Q{i}")
    clock.advance(0)
    journal.close()
    [segment] = os.listdir(tmp_path / "journal")
    with open(tmp_path / "journal" / segment, "ab") as f:
        f.write(b'{"seq":4,"event_id":"torn')  # a crash in the middle of a write (never acknowledged)
    again = journal_at(tmp_path, clock)
    assert again.last_seq == 3
    again.emit("bounced", qid="Q9")
    clock.advance(0)
    assert [r["seq"] for r in again.read(0, 10)] == [1, 2, 3, 4]
    assert again.read(3, 10)[0]["type"] == "bounced"


def test_events_within_the_commit_delay_share_one_write_and_fsync(tmp_path):
    clock = task.Clock()
    journal = EventJournal(str(tmp_path / "j"), clock, commit_delay=0.02)
    writes = []
    journal.listeners.append(writes.append)  # told once per write + fsync
    journal.emit("delivered", qid="Q1")
    first = journal.synced()
    clock.advance(0.01)
    journal.emit("delivered", qid="Q2")
    second = journal.synced()
    assert not first.called
    assert journal.read(0, 10) == []
    clock.advance(0.01)
    assert first.called
    assert second.called
    assert writes == [2]
    assert [r["qid"] for r in journal.read(0, 10)] == ["Q1", "Q2"]
    journal.emit("delivered", qid="Q3")
    clock.advance(0.02)
    assert writes == [2, 3]
    assert clock.getDelayedCalls() == []


def test_segments_rotate_and_are_pruned_once_read(tmp_path):
    clock = task.Clock()
    journal = EventJournal(str(tmp_path / "j"), clock, segment_size=300)
    for i in range(20):
        journal.emit("delivered", qid=f"Q{i}")
        clock.advance(0)
    assert len(journal.segments) > 3
    assert [r["qid"] for r in journal.read(0, 100)] == [f"Q{i}" for i in range(20)]
    assert [r["seq"] for r in journal.read(7, 3)] == [8, 9, 10]
    journal.prune(15)
    assert journal.segments[0] <= 16
    assert len(os.listdir(tmp_path / "j")) == len(journal.segments)
    assert [r["seq"] for r in journal.read(15, 100)] == list(range(16, 21))


def test_delivery_outcomes_become_events_with_bounce_classification(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    seen = []
    accounting = SimpleNamespace(record=lambda event, **f: seen.append(event))
    events = AccountingEvents(journal, accounting)
    events.record("received", qid="Q1")  # accounting only
    d = events.record("bounced", qid="Q1", sender="s@a.example", recipient="r@b.example", campaign="dec", provider="gmail",
                  metadata={"id": 7}, reply={"code": 550, "enhanced": "5.1.1", "text": "5.1.1 User unknown"})  # fmt: skip
    assert not d.called  # the queue manager waits for this before it writes the new state
    clock.advance(0)
    assert d.called
    assert seen == ["received", "bounced"]
    [record] = journal.read(0, 10)
    assert record["type"] == "bounced"
    assert record["enhanced"] == "5.1.1"
    assert record["metadata"] == {"id": 7}
    assert record["bounce"] == {"reason": "userunknown", "class": "hard"}
    assert record["provider"] == "gmail"


def test_signature_is_hmac_of_timestamp_dot_body():
    body = b'[{"event_id":"x"}]'
    header = sign(SECRET, 1_700_000_000, body)
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET, header, body, now=1_700_000_010)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_010)
    assert not verify(SECRET, header, body, now=1_700_001_000)  # a replay long after


class ScriptedReceiver:
    """``post`` answers with the next scripted outcome: an int status, or an exception."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []

    def post(self, url, body, headers):
        self.requests.append((body, headers))
        outcome = self.script.pop(0) if self.script else 200
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        if outcome == "hang":
            return defer.Deferred()
        return defer.succeed(outcome)


def sender_for(tmp_path, clock, journal, receiver, **kw):
    directory = tmp_path / "hooks"
    directory.mkdir(exist_ok=True)
    return WebhookSender(hook(**kw), SECRET, journal, str(directory), clock, receiver.post,
                         lambda f, *a: defer.maybeDeferred(f, *a), rng=random.Random(1))  # fmt: skip


def test_down_then_500_then_200_delivers_every_event_in_order_with_backoff(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver([error.ConnectionRefusedError(), 500, "hang", 503, 429, 408, 200])
    sender = sender_for(tmp_path, clock, journal, receiver, batch_size=2, timeout=5.0)
    journal.listeners.append(sender.wake)
    for i in range(5):
        journal.emit("delivered", qid=f"Q{i}")
    clock.advance(0)
    sender.start()
    delays = []
    for _ in range(50):
        if sender.cursor.seq == 5:
            break
        assert sender.next_attempt is not None or sender._inflight is not None
        if sender.next_attempt is not None:
            step = sender.next_attempt - clock.seconds()
            delays.append(step)
        else:
            step = 5.0  # a request that hangs: its timeout
        clock.advance(step)
    assert sender.cursor.seq == 5
    assert sender.cursor.delivered == 5
    assert sender.cursor.dropped == 0
    # backoff grows (jittered, between half and all of 1, 2, 4, 8, 16, 32 s) until the endpoint answers 2xx
    assert len(delays) == 6, delays
    assert all(0.5 * 2**i <= d <= 2**i for i, d in enumerate(delays)), delays
    received = {}
    order = []
    for body, headers in receiver.requests:
        assert verify(SECRET, headers["X-Pymta-Signature"], body, now=clock.seconds(), tolerance=3600)
        batch = json.loads(body)
        assert headers["X-Pymta-Event-Count"] == str(len(batch))
        for event in batch:
            received.setdefault(event["event_id"], event)
            order.append(event["seq"])
    assert sorted(e["seq"] for e in received.values()) == [1, 2, 3, 4, 5]  # each once after de-dup
    assert [s for i, s in enumerate(order) if s not in order[:i]] == [1, 2, 3, 4, 5]  # first deliveries in order
    # the cursor is durable: a new sender (a restart) starts after the last accepted event
    again = sender_for(tmp_path, clock, journal, ScriptedReceiver([]))
    assert again.cursor.seq == 5
    assert again.cursor.delivered == 5


def test_a_400_drops_the_batch_with_a_record_and_a_count(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver([400, 200])
    sender = sender_for(tmp_path, clock, journal, receiver, batch_size=1)
    journal.listeners.append(sender.wake)
    sender.start()
    journal.emit("complaint", qid="Q1", recipient="a@b.example")
    journal.emit("delivered", qid="Q2")
    clock.advance(0)
    assert sender.cursor.seq == 2
    assert sender.cursor.dropped == 1
    assert sender.cursor.delivered == 1
    [line] = (tmp_path / "hooks" / "crm.dropped.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["why"] == "HTTP 400"
    assert record["event"]["type"] == "complaint"
    assert isinstance(json.loads(receiver.requests[0][0]), dict)  # batch_size 1: one object per POST
    assert sender.status()["dropped"] == 1
    assert sender.status()["backlog"] == 0


def test_events_older_than_max_age_are_given_up_after_a_failure(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver([500] * 100)
    sender = sender_for(tmp_path, clock, journal, receiver, batch_size=10, max_age=60.0, retry_max=10.0)
    journal.listeners.append(sender.wake)
    sender.start()
    journal.emit("delivered", qid="Q1")
    clock.advance(0)
    for _ in range(30):
        if sender.cursor.dropped:
            break
        clock.advance(10.0)
    assert sender.cursor.dropped == 1
    assert sender.cursor.seq == 1
    assert "max_age" in (tmp_path / "hooks" / "crm.dropped.jsonl").read_text()


def test_only_the_chosen_event_types_are_posted(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver([])
    sender = sender_for(tmp_path, clock, journal, receiver, events=("bounced",), batch_size=5)
    journal.listeners.append(sender.wake)
    sender.start()
    for kind in ("delivered", "bounced", "deferred", "bounced"):
        journal.emit(kind)
    clock.advance(0)
    [(body, _)] = receiver.requests
    assert [e["type"] for e in json.loads(body)] == ["bounced", "bounced"]
    assert sender.cursor.seq == 4


def test_webhook_config_errors_name_the_key():
    def load(text):
        import tomllib

        return build_config(tomllib.loads(text), "x.toml")

    good = load('[[webhooks]]\nname = "crm"\nurl = "https://crm.example/e"\nsecret = "0123456789abcdef"\nbatch_size = 1\n')
    assert good.webhooks[0].batch_size == 1
    assert good.webhooks[0].max_age == 3 * 86400
    for text, key in (
        ('[[webhooks]]\nname = "crm"\nurl = "ftp://x"\nsecret = "0123456789abcdef"', "webhooks[1].url"),
        ('[[webhooks]]\nname = "crm"\nurl = "https://x.example"', "webhooks[1].secret"),
        ('[[webhooks]]\nname = "crm"\nurl = "https://x.example"\nsecret = "0123456789abcdef"\nevents = ["nope"]',
         "webhooks[1].events"),
        ('[[webhooks]]\nname = "crm"\nurl = "https://x.example"\nsecret = "0123456789abcdef"\nbatch_size = 0',
         "webhooks[1].batch_size"),
        ("[tracking]\nenabled = true", "tracking.enabled"),
    ):  # fmt: skip
        try:
            load(text)
        except ConfigError as e:
            assert str(e).startswith(f"x.toml: {key}:"), str(e)
        else:
            raise AssertionError(f"accepted {text!r}")


def test_stopping_while_a_post_hangs_leaves_no_timer_and_keeps_the_batch(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver(["hang"])
    sender = sender_for(tmp_path, clock, journal, receiver)
    journal.listeners.append(sender.wake)
    sender.start()
    journal.emit("delivered", qid="Q1")
    clock.advance(0)
    assert len(receiver.requests) == 1
    sender.stop()
    assert clock.getDelayedCalls() == []
    assert sender.cursor.seq == 0


def test_status_of_a_stopped_mta_comes_from_the_journal_and_the_cursor(tmp_path):
    from pymta.events.webhooks import status_from_disk

    clock = task.Clock()
    journal = EventJournal(str(tmp_path / "events" / "journal"), clock)
    directory = tmp_path / "events" / "webhooks"
    directory.mkdir(parents=True)
    receiver = ScriptedReceiver([200, 500])
    sender = WebhookSender(hook(batch_size=2), SECRET, journal, str(directory), clock, receiver.post,
                           lambda f, *a: defer.maybeDeferred(f, *a))  # fmt: skip
    journal.listeners.append(sender.wake)
    sender.start()
    for i in range(5):
        journal.emit("delivered", qid=f"Q{i}")
    clock.advance(0)
    sender.stop()
    journal.close()
    [status] = status_from_disk(str(tmp_path), (hook(),))
    assert (status["backlog"], status["delivered"], status["dropped"]) == (3, 2, 0)


def test_a_batch_that_is_not_full_waits_for_the_linger_and_a_full_one_goes_at_once(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver([])
    sender = sender_for(tmp_path, clock, journal, receiver, batch_size=4, linger=1.0)
    saves = []
    journal.listeners.append(sender.wake)
    sender.run = lambda f, *a: saves.append(a) or defer.maybeDeferred(f, *a)
    sender.start()
    journal.emit("delivered", qid="Q1")
    clock.advance(0)
    journal.emit("delivered", qid="Q2")
    clock.advance(0.5)
    assert receiver.requests == []
    assert sender.status()["backlog"] == 2
    clock.advance(0.5)
    [(body, headers)] = receiver.requests  # after the linger: one POST, one cursor save, both events
    assert [e["qid"] for e in json.loads(body)] == ["Q1", "Q2"]
    assert headers["X-Pymta-Event-Count"] == "2"
    assert len(saves) == 1
    assert sender.cursor.seq == 2
    for i in range(3, 7):
        journal.emit("delivered", qid=f"Q{i}")
    clock.advance(0)
    assert len(receiver.requests) == 2  # a full batch goes at once, no linger
    assert [e["qid"] for e in json.loads(receiver.requests[1][0])] == ["Q3", "Q4", "Q5", "Q6"]
    for i in range(7, 13):  # six: one full batch now, the two left after the linger
        journal.emit("delivered", qid=f"Q{i}")
    clock.advance(0)
    assert len(receiver.requests) == 3
    assert sender.cursor.seq == 10
    assert [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()] == [1.0]
    clock.advance(1.0)
    assert len(receiver.requests) == 4
    assert sender.cursor.seq == 12
    assert sender.status()["backlog"] == 0
    assert clock.getDelayedCalls() == []


def test_a_retry_after_a_failure_does_not_linger_again(tmp_path):
    clock = task.Clock()
    journal = journal_at(tmp_path, clock)
    receiver = ScriptedReceiver([503, 200])
    sender = sender_for(tmp_path, clock, journal, receiver, batch_size=10, linger=2.0, retry_initial=1.0)
    journal.listeners.append(sender.wake)
    sender.start()
    journal.emit("delivered", qid="Q1")
    clock.advance(0)
    assert receiver.requests == []
    clock.advance(2.0)
    assert len(receiver.requests) == 1
    assert sender.next_attempt is not None
    clock.advance(sender.next_attempt - clock.seconds())
    assert len(receiver.requests) == 2
    assert sender.cursor.seq == 1
    assert clock.getDelayedCalls() == []


def test_linger_is_bounded_in_the_config():
    import tomllib

    base = '[[webhooks]]\nname = "crm"\nurl = "https://crm.example/e"\nsecret = "0123456789abcdef"\n'
    assert build_config(tomllib.loads(base), "x.toml").webhooks[0].linger == 1.0
    assert build_config(tomllib.loads(base + 'linger = "250ms"'), "x.toml").webhooks[0].linger == 0.25
    try:
        build_config(tomllib.loads(base + 'linger = "2m"'), "x.toml")
    except ConfigError as e:
        assert str(e).startswith("x.toml: webhooks[1].linger:"), str(e)
        assert "at most 60s" in str(e), str(e)
    else:
        raise AssertionError("a linger of 2 minutes was accepted")
