"""Webhooks and tracking through the real ``twistd pymta`` and a twisted.web receiver on loopback:
a receiver that is down, then answers 500, then 200 gets every event once (after de-duplication
by event_id), in order, signed; ``kill -9`` with events pending loses none; a 400 drops with a
record; tracked links and the open pixel answer, forged tokens get 404."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pymta.admin.http.tokens import digest
from pymta.events.webhooks import verify
from tests.mta_process import ROOT, MTAProcess, free_port, http_service_config, wait_for_port, wait_until

pytestmark = pytest.mark.timeout(240)

DKIM_KEY = rsa.generate_private_key(65537, 2048)

ADMIN = "admin-token-0123456789abcdefghijklmnop"
HOOK_SECRET = "hook-secret-0123456789abcdef"
FEEDBACK_SECRET = "feedback-secret-0123456789abc"


class Receiver:
    """The test's webhook receiver process (tests/webhook_receiver.py) and what it received."""

    def __init__(self, workdir: str, port: int) -> None:
        self.port = port
        self.log = os.path.join(workdir, "hook-requests.jsonl")
        self.mode_file = os.path.join(workdir, "hook-mode")
        self.proc: subprocess.Popen | None = None
        self.mode(200)

    def mode(self, status: int) -> None:
        with open(self.mode_file + ".tmp", "w") as f:
            f.write(str(status))
        os.replace(self.mode_file + ".tmp", self.mode_file)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.webhook_receiver", str(self.port), self.log,
                                      self.mode_file], cwd=ROOT, stdin=subprocess.DEVNULL)  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 30, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def requests(self) -> list[dict]:
        if not os.path.exists(self.log):
            return []
        with open(self.log, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def accepted_events(self) -> list[dict]:
        """Events of 2xx answers, de-duplicated by event_id, in the order first received."""
        seen: dict[str, dict] = {}
        for request in self.requests():
            if request["status"] // 100 != 2:
                continue
            body = json.loads(request["body"])
            for event in body if isinstance(body, list) else [body]:
                seen.setdefault(event["event_id"], event)
        return list(seen.values())


def api(port: int, path: str, token: str | None = ADMIN, method: str = "GET", body=None) -> tuple[int, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None)  # fmt: skip
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url: str, agent: str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0") -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, headers={"User-Agent": agent})
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webhooks")
    tokens = tmp / "api-tokens"
    tokens.write_text(f"ops:admin,inject:{digest(ADMIN)}\n")
    api_port, public_port, hook_port = free_port(), free_port(), free_port()
    receiver = Receiver(str(tmp), hook_port)
    key_path = tmp / "shop.pem"
    key_path.write_bytes(DKIM_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))  # fmt: skip
    mta = MTAProcess(str(tmp), extra_config=http_service_config(FEEDBACK_SECRET, api_port, public_port, tokens) + textwrap.dedent(f"""
        [dkim."shop.example"]
        selector = "s1"
        key = "{key_path}"
        [tracking]
        enabled = true
        opens = false
        clicks = false
        [[webhooks]]
        name = "crm"
        url = "http://127.0.0.1:{hook_port}/hook"
        secret = "{HOOK_SECRET}"
        events = ["delivered", "bounced", "open", "click"]
        batch_size = 3
        timeout = "2s"
        retry_initial = "200ms"
        retry_max = "1s"
        """)).start()  # fmt: skip
    wait_for_port("127.0.0.1", api_port, 30)
    yield mta, receiver, api_port, public_port
    receiver.stop()
    mta.stop()


def send(mta: MTAProcess, sender: str, rcpt: str = "alice@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.sendmail(sender, [rcpt], f"From: {sender}\r\nTo: {rcpt}\r\nSubject: hi\r\n\r\nbody\r\n")


def backlog(api_port: int) -> int:
    status, answer = api(api_port, "/api/v1/webhooks")
    assert status == 200, answer
    [hook] = answer["webhooks"]
    return hook["backlog"]


def test_down_then_500_then_200_every_event_once_in_order_and_signed(world):
    mta, receiver, api_port, _ = world
    senders = [f"s{i}@down.example" for i in range(7)]
    for s in senders:
        send(mta, s)
    wait_until(lambda: backlog(api_port) >= 7, 30, "7 events pending while the receiver is down")
    receiver.mode(500)
    receiver.start()
    wait_until(lambda: any(r["status"] == 500 for r in receiver.requests()), 30, "a request answered 500")
    receiver.mode(200)
    wait_until(lambda: {e.get("sender") for e in receiver.accepted_events()} >= set(senders), 60, "every event")
    events = [e for e in receiver.accepted_events() if e.get("sender") in senders]
    assert sorted(e["sender"] for e in events) == sorted(senders)  # each exactly once after de-dup
    assert all(e["type"] == "delivered" and e["recipient"] == "alice@example.test" and e["qid"] for e in events)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)  # in order
    for request in receiver.requests():
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert verify(HOOK_SECRET.encode(), headers["x-pymta-signature"], request["body"].encode(), now=__import__("time").time())
        assert int(headers["x-pymta-event-count"]) == len(json.loads(request["body"]))
    wait_until(lambda: backlog(api_port) == 0, 30, "no backlog")


def test_kill_9_with_events_pending_loses_none(world):
    mta, receiver, api_port, _ = world
    receiver.mode(503)
    if receiver.proc is None:  # run on its own: the receiver is not up yet
        receiver.start()
    senders = [f"k{i}@kill.example" for i in range(5)]
    for s in senders:
        send(mta, s)
    wait_until(lambda: len([m for m in mta.maildir_messages("alice@example.test") if b"kill.example" in m]) == 5, 30,
               "the 5 messages delivered")  # fmt: skip
    # Each delivery recorded and its message gone from the queue: a kill before that would deliver
    # the message again after the restart, a second delivery with an event of its own.
    wait_until(lambda: not any(mta.queue_files(state) for state in ("incoming", "active", "deferred")), 30,
               "the queue empty")  # fmt: skip
    wait_until(lambda: backlog(api_port) >= 5, 30, "the events pending")
    mta.stop(signal.SIGKILL)
    receiver.mode(200)
    mta.start()
    wait_until(lambda: {e.get("sender") for e in receiver.accepted_events()} >= set(senders), 60, "every event")
    # At least once: a batch the receiver took just before the kill may come again, with the same
    # event_id; after de-duplication by event_id each message's event is there exactly once.
    unique = {e["event_id"]: e for e in receiver.accepted_events() if e.get("sender") in senders}
    assert sorted(e["sender"] for e in unique.values()) == sorted(senders)


def test_a_400_drops_the_event_with_a_record_and_a_count(world):
    mta, receiver, api_port, _ = world
    receiver.mode(400)
    send(mta, "drop@four.example")
    path = os.path.join(mta.state_dir, "events", "webhooks", "crm.dropped.jsonl")
    wait_until(lambda: os.path.exists(path) and "drop@four.example" in open(path).read(), 30, "the drop record")  # noqa: SIM115 (kept open beyond this block)
    records = [json.loads(line) for line in open(path)]  # noqa: SIM115 (kept open beyond this block)
    assert any(r["why"] == "HTTP 400" and r["event"]["sender"] == "drop@four.example" for r in records)
    _status, answer = api(api_port, "/api/v1/webhooks")
    assert answer["webhooks"][0]["dropped"] >= 1
    out = subprocess.run([sys.executable, "-m", "pymta.admin.cli", "--config", mta.config_path, "webhooks"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["webhooks"][0]["dropped"] >= 1, out.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert re.search(r'^pymta_webhook_backlog\{webhook="crm"\} \d', metrics, re.M), metrics
    dropped = re.search(r'^pymta_webhook_dropped_total\{webhook="crm"\} (\d+)', metrics, re.M)
    assert dropped
    assert float(dropped.group(1)) >= 1
    receiver.mode(200)


def test_tracked_links_redirect_the_pixel_answers_and_forgeries_get_404(world):
    mta, receiver, api_port, public_port = world
    receiver.mode(200)
    html = ('<HTML><BODY><P>Hi <A HREF=https://shop.example/sale?a=1&amp;b=2>sale</A> '
            '<a href="mailto:help@shop.example">help</a> <a href="#top">top</a>'
            '<!-- <a href="https://hidden.example/">x</a> --></BODY></HTML>')  # fmt: skip
    status, answer = api(api_port, "/api/v1/inject", method="POST", body={
        "envelope_sender": "news@shop.example", "recipients": [{"email": "bob@example.test"}],
        "campaign": "dec", "track": {"opens": True, "clicks": True},
        "content": {"from": "news@shop.example", "subject": "Sale", "text_body": "see https://shop.example/sale",
                    "html_body": html},
    })  # fmt: skip
    assert status == 200, answer
    assert answer["success_count"] == 1, answer
    [qid] = answer["queue_ids"]
    message = wait_until(lambda: mta.maildir_messages("bob@example.test"), 30, "the tracked message")[-1]
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    text = parsed.get_body(("plain",)).get_content()
    html_out = parsed.get_body(("html",)).get_content()
    assert "https://shop.example/sale" in text  # the text part is left alone
    # Signed (at injection) after the rewrite: the signature covers the tracked links and verifies.
    public = DKIM_KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    assert message.count(b"DKIM-Signature:") == 1
    assert dkim.verify(message, dnsfunc=lambda name, timeout=5: record if name == b"s1._domainkey.shop.example." else None)
    assert "mailto:help@shop.example" in html_out
    assert 'href="#top"' in html_out
    assert "https://hidden.example/" in html_out
    [link] = re.findall(r'HREF="https://mail\.example\.test(/t/c/[^"]+)"', html_out)
    [pixel] = re.findall(r'src="https://mail\.example\.test(/t/o/[^"]+\.gif)"', html_out)
    base = f"http://127.0.0.1:{public_port}"
    code, headers, _ = fetch(base + link)
    assert code == 302
    assert headers["Location"] == "https://shop.example/sale?a=1&b=2"
    forged = link[:-3] + ("A" if link[-3] != "A" else "B") + link[-2:]
    assert fetch(base + forged)[0] == 404
    token = link.rsplit("/", 1)[1]
    _payload, mac = token.split(".")
    evil = base64.urlsafe_b64encode(f"{qid}\x00bob@example.test\x00https://evil.example/".encode()).rstrip(b"=").decode()
    assert fetch(f"{base}/t/c/{evil}.{mac}")[0] == 404  # no open redirect with another URL
    code, headers, body = fetch(base + pixel)
    assert code == 200
    assert headers["Content-Type"] == "image/gif"
    assert body.startswith(b"GIF89a")
    assert "no-cache" in headers["Cache-Control"]
    assert fetch(base + pixel, agent="Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)")[0] == 200
    wait_until(lambda: len([e for e in receiver.accepted_events() if e["type"] in ("open", "click")]) >= 3, 30,
               "the open and click events")  # fmt: skip
    events = [e for e in receiver.accepted_events() if e["type"] in ("open", "click")]
    [click] = [e for e in events if e["type"] == "click"]
    assert click["qid"] == qid
    assert click["recipient"] == "bob@example.test"
    assert click["url"] == "https://shop.example/sale?a=1&b=2"
    assert click["machine"] is False
    opens = [e for e in events if e["type"] == "open"]
    assert sorted(e["machine"] for e in opens) == [False, True]
