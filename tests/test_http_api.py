"""The HTTP service through the real ``twistd pymta``: tokens and scopes, JSON errors, injection,
the admin API, /metrics and one-click unsubscribe over HTTP on loopback."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import re
import smtplib
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from pymta.admin.http.tokens import digest
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port, http_service_config, wait_for_port

pytestmark = pytest.mark.timeout(180)

ADMIN = "admin-token-0123456789abcdefghijklmnop"
INJECT = "inject-token-0123456789abcdefghijklmno"
SECRET = "http-feedback-secret-0123456789"


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body=None, token: str | None = ADMIN, raw: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, object, dict]:  # fmt: skip
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None and raw is None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload, status, hdrs = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            payload, status, hdrs = e.read(), e.code, dict(e.headers)
        ctype = hdrs.get("Content-Type", "")
        return status, (json.loads(payload) if "json" in ctype else payload.decode("utf-8", "replace")), hdrs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    dns = DNSServer(Zone({}, servfail=["remote.example"])).start()
    tokens = tmp / "api-tokens"
    tokens.write_text(f"# test tokens\nops:admin:{digest(ADMIN)}\ncrm:inject:{digest(INJECT)}\n")
    api_port, public_port = free_port(), free_port()
    mta = MTAProcess(str(tmp), dns=dns.address, extra_config=http_service_config(SECRET, api_port, public_port, tokens) + textwrap.dedent("""
        max_body = 2000000
        template_timeout = "1s"
        metric_campaigns = ["dec"]
        """)).start()  # fmt: skip
    wait_for_port("127.0.0.1", api_port, 30)
    yield mta, Client(api_port), Client(public_port)
    mta.stop()
    dns.stop()


def test_every_api_call_needs_a_token_with_the_right_scope(world):
    _, api, _ = world
    status, body, headers = api.call("GET", "/api/v1/queue", token=None)
    assert status == 401
    assert body == {"error": "a valid bearer token is needed"}
    assert "Bearer" in headers["WWW-Authenticate"]
    assert api.call("GET", "/api/v1/queue", token="wrong")[0] == 401
    status, body, _ = api.call("GET", "/api/v1/queue", token=INJECT)
    assert status == 403
    assert "read" in body["error"]
    status, body, _ = api.call("POST", "/api/v1/inject", {"x": 1}, token=ADMIN)
    assert status == 403
    assert "inject" in body["error"]
    assert api.call("GET", "/api/v1/queue", token=ADMIN)[0] == 200
    status, body, _ = api.call("GET", "/healthz", token=None)
    assert status == 200
    assert body["ok"] is True
    assert set(body["queue"]) >= {"incoming", "deferred"}


def test_bad_requests_get_json_errors_naming_the_field(world):
    _, api, _ = world
    status, body, _ = api.call("POST", "/api/v1/inject", raw=b"{not json", token=INJECT,
                               headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400
    assert body["error"].startswith("the body is not valid JSON")
    status, body, _ = api.call("POST", "/api/v1/inject", {"recipients": ["a@example.test"], "content": "x"}, token=INJECT)
    assert (status, body["field"]) == (400, "envelope_sender")
    status, body, _ = api.call("POST", "/api/v1/inject", {
        "envelope_sender": "s@example.org", "recipients": [{"email": "alice@example.test"}],
        "content": {"from": "s@example.org", "subject": "{% if %}", "text_body": "x"}}, token=INJECT)  # fmt: skip
    assert (status, body["field"]) == (400, "content.subject")
    assert "syntax" in body["error"]
    status, body, _ = api.call("POST", "/api/v1/inject", raw=b"x" * 2_100_000, token=INJECT,
                               headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 413
    assert body == {"error": "request body too large"}
    assert api.call("GET", "/api/v1/nothing")[0] == 404
    status, _, headers = api.call("PUT", "/api/v1/queue", {})
    assert status == 405
    assert "GET" in headers["Allow"]
    status, body, _ = api.call("GET", "/api/v1/queue/messages?limit=abc")
    assert (status, body["field"]) == (400, "limit")
    assert api.call("GET", "/api/v1/messages/not-a-qid")[0] == 400


def test_injection_personalises_each_recipient_and_fails_only_the_bad_ones(world):
    mta, api, _ = world
    request = {
        "envelope_sender": "news@example.org",
        "recipients": [
            {"email": "alice@example.test", "name": "Ann Älter", "substitutions": {"first": "Ann"},
             "metadata": {"crm_id": "42"}},
            {"email": "bob@example.test", "substitutions": {}},  # "first" undefined: this one fails
            {"email": "not an address"},
            {"email": "nobody@example.test", "substitutions": {"first": "N"}},  # no such mailbox
        ],
        "content": {
            "from": {"email": "news@example.org", "name": "Example News"}, "reply_to": "help@example.org",
            "subject": "Hello {{ first }} — {{ year }}", "text_body": "Hi {{ first }}\n.dot line\n",
            "html_body": "<p>Hi {{ first }}</p>", "headers": {"X-Campaign": "dec"},
            "attachments": [{"file_name": "a.txt", "content_type": "text/plain",
                             "data": base64.b64encode(b"attached").decode()}],
        },
        "substitutions": {"year": 2026}, "campaign": "dec", "tenant": "acme",
    }  # fmt: skip
    status, body, _ = api.call("POST", "/api/v1/inject", request, token=INJECT)
    assert status == 200, body
    assert body["success_count"] == 1
    assert body["fail_count"] == 3
    assert len(body["queue_ids"]) == 1
    reasons = {f["email"]: f["reason"] for f in body["failed_recipients"]}
    assert "template error" in reasons["bob@example.test"]
    assert "first" in reasons["bob@example.test"]
    assert reasons["not an address"].startswith("5.1.3")
    assert reasons["nobody@example.test"].startswith("5.1.1")
    [raw] = mta.wait_for(lambda: mta.maildir_messages("alice@example.test"), what="the injected message")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(msg["Subject"]) == "Hello Ann — 2026"
    assert "Ann Älter" in str(msg["To"])
    assert msg["X-Campaign"] == "dec"
    assert msg["Message-ID"]
    assert msg["Date"]
    assert f"with HTTP id {body['queue_ids'][0]}" in " ".join(msg.get_all("Received"))
    assert msg.get_body(("plain",)).get_content() == "Hi Ann\n.dot line\n"
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hi Ann</p>"
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "a.txt"
    assert attachment.get_content() == "attached"
    # campaign, tenant and metadata travel into the accounting log.
    log = os.path.join(mta.state_dir, "log", "accounting.jsonl")
    received = mta.wait_for(
        lambda: [r for r in map(json.loads, open(log).read().splitlines())  # noqa: SIM115 (kept open beyond this block)
                 if r["event"] == "received" and r["qid"] == body["queue_ids"][0]],
        what="the received record")  # fmt: skip
    assert received[0]["campaign"] == "dec"
    assert received[0]["tenant"] == "acme"
    assert received[0]["metadata"] == {"crm_id": "42"}


def test_html_substitutions_are_escaped_and_a_runaway_template_fails_its_recipient(world):
    mta, api, _ = world
    request = {
        "envelope_sender": "news@example.org",
        # The runaway comes first: the recipient rendered after it, in the same chunk, still gets its message.
        "recipients": [{"email": "alice@example.test", "substitutions": {"first": "A", "spin": True}},
                       {"email": "bob@example.test", "substitutions": {"first": "<script>x</script>", "spin": False}}],
        "content": {"from": "news@example.org", "subject": "s", "html_body":
                    "<p>{{ first }}</p>{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}"
                    "{% endfor %}{% endfor %}{% endif %}"},
    }  # fmt: skip
    status, body, _ = api.call("POST", "/api/v1/inject", request, token=INJECT)
    assert status == 200, body
    assert body["success_count"] == 1, body
    assert body["failed_recipients"] == [{"email": "alice@example.test", "reason": "template error: template ran too long"}]
    messages = mta.wait_for(
        lambda: [m for m in mta.maildir_messages("bob@example.test") if b"&lt;script&gt;" in m], what="bob's message")
    assert b"<script>" not in messages[0]
    # The API still answers after the interrupted template.
    assert api.call("GET", "/healthz", token=None)[0] == 200


def test_raw_content_is_queued_as_given(world):
    mta, api, _ = world
    raw = "From: a@example.org\nTo: bob@example.test\nSubject: raw one\n\nline\n"
    status, body, _ = api.call("POST", "/api/v1/inject", {
        "envelope_sender": "a@example.org", "recipients": ["bob@example.test"], "content": raw}, token=INJECT)  # fmt: skip
    assert status == 200
    assert body["success_count"] == 1
    mta.wait_for(lambda: [m for m in mta.maildir_messages("bob@example.test") if b"Subject: raw one\n\nline\n" in m.replace(b"\r\n", b"\n")],
                 what="the raw message")  # fmt: skip
    status, body, _ = api.call("POST", "/api/v1/inject", {
        "envelope_sender": "a@example.org", "recipients": ["bob@example.test"], "content": "no header here"},
        token=INJECT)  # fmt: skip
    assert (status, body["field"]) == (400, "content")


def test_admin_api_shows_and_steers_the_queue(world):
    mta, api, _ = world
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.sendmail("s@example.org", ["carol@remote.example"], "Subject: waits\r\n\r\nx\r\n")
    [qid] = mta.wait_for(lambda: mta.queue_files("deferred"), what="the deferral (remote.example SERVFAILs)")
    qid = qid.split(".")[0]
    status, shape, _ = api.call("GET", "/api/v1/queue", token=ADMIN)
    assert status == 200
    assert shape["messages"]["deferred"] >= 1
    [entry] = [d for d in shape["domains"] if d["domain"] == "remote.example"]
    assert entry["by_state"]["deferred"] == 1
    assert sum(entry["by_age"].values()) == 1
    assert "<5m" in entry["by_age"]
    status, page, _ = api.call("GET", "/api/v1/queue/messages?state=deferred&domain=remote.example&limit=1")
    assert status == 200
    assert [m["qid"] for m in page["messages"]] == [qid]
    status, shown, _ = api.call("GET", f"/api/v1/messages/{qid}")
    assert status == 200
    assert "Subject: waits" in shown["headers"]
    assert shown["recipients"][0]["address"] == "carol@remote.example"
    assert api.call("POST", f"/api/v1/messages/{qid}/hold")[0] == 200
    mta.wait_for(lambda: qid in [n.split(".")[0] for n in mta.queue_files("hold")], what="held")
    assert api.call("POST", f"/api/v1/messages/{qid}/release")[0] == 200
    mta.wait_for(lambda: qid not in [n.split(".")[0] for n in mta.queue_files("hold")], what="released")
    status, _, _ = api.call("POST", f"/api/v1/messages/{qid}/bogus")
    assert status == 404
    assert api.call("DELETE", f"/api/v1/messages/{qid}")[0] == 200
    # A delete during a delivery attempt takes effect when the attempt ends.
    mta.wait_for(lambda: api.call("GET", f"/api/v1/messages/{qid}")[0] == 404, what="the message gone")
    assert api.call("DELETE", f"/api/v1/messages/{qid}", token=INJECT)[0] == 403


def test_suppressions_through_the_api_are_honoured_by_injection(world):
    _, api, _ = world
    status, entry, _ = api.call("POST", "/api/v1/suppressions", {"address": "Alice@Example.test", "reason": "asked"})
    assert status == 201
    assert entry["address"] == "alice@example.test"
    status, page, _ = api.call("GET", "/api/v1/suppressions?limit=1000")
    assert "alice@example.test" in [e["address"] for e in page["suppressions"]]
    status, body, _ = api.call("POST", "/api/v1/inject", {
        "envelope_sender": "n@example.org", "recipients": ["alice@example.test"], "content": "Subject: x\n\ny\n"},
        token=INJECT)  # fmt: skip
    assert body["success_count"] == 0
    assert "suppressed" in body["failed_recipients"][0]["reason"]
    assert api.call("DELETE", "/api/v1/suppressions/alice@example.test")[0] == 200
    assert api.call("DELETE", "/api/v1/suppressions/alice@example.test")[0] == 404
    assert api.call("POST", "/api/v1/suppressions", {"address": "nope"})[0] == 400


def test_metrics_count_received_mail_and_delivery_results(world):
    mta, api, _ = world
    before = _metric(api, 'pymta_messages_received_total{listener="smtp"}')
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.sendmail("s@example.org", ["bob@example.test"], "Subject: m\r\n\r\nx\r\n")
    mta.wait_for(lambda: _metric(api, 'pymta_messages_received_total{listener="smtp"}') == before + 1, what="counted")
    text = api.call("GET", "/metrics", token=None)[1]
    assert re.search(r'pymta_delivery_results_total\{campaign="dec",pool="",result="delivered",source="",tenant=""\} [1-9]', text), text
    assert 'pymta_queue_messages{state="deferred"}' in text
    assert "pymta_delivery_latency_seconds_bucket" in text
    assert re.search(r'pymta_injected_recipients_total\{outcome="queued"\} [1-9]', text)


def _metric(api: Client, name: str) -> float:
    text = api.call("GET", "/metrics", token=None)[1]
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_one_click_unsubscribe_over_https_uri_suppresses_only_the_signed_recipient(world):
    _, api, public = world
    from pymta.feedback.verp import Tagger

    tagger = Tagger(SECRET, "bounces.example.test")
    token = tagger.unsubscribe_token("0123456789ABCDEF", "reader@remote.example", "example.org")
    status, page, _ = public.call("GET", f"/u/{token}", token=None)
    assert status == 200
    assert "reader@remote.example" in page
    assert 'method="post"' in page
    assert "reader@remote.example" not in _suppressed(api)  # a GET (link scanner) changes nothing
    forged = token.replace(tagger.mac("0123456789ABCDEF", "reader@remote.example", "u", "example.org"), "a" * 16)
    assert public.call("POST", f"/u/{forged}", token=None, raw=b"List-Unsubscribe=One-Click")[0] == 404
    status, page, _ = public.call("POST", f"/u/{token}", token=None, raw=b"List-Unsubscribe=One-Click",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert status == 200
    assert "unsubscribed" in page
    entries = [e for e in api.call("GET", "/api/v1/suppressions?limit=1000")[1]["suppressions"]
               if e["address"] == "reader@remote.example"]  # fmt: skip
    assert [(e["scope"], e["source"]) for e in entries] == [("example.org", "unsubscribe")]


def _suppressed(api: Client) -> list[str]:
    return [e["address"] for e in api.call("GET", "/api/v1/suppressions?limit=1000")[1]["suppressions"]]


def test_pymta_token_prints_a_token_and_its_line():
    out = subprocess.run([sys.executable, "-m", "pymta.admin.http.tokens", "crm", "--scopes", "inject,read"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0
    token = re.search(r"^token: (\S+)$", out.stdout, re.M).group(1)
    line = re.search(r"^line:  (\S+)$", out.stdout, re.M).group(1)
    assert line == f"crm:inject,read:{digest(token)}"
    bad = subprocess.run([sys.executable, "-m", "pymta.admin.http.tokens", "x", "--scopes", "root"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2
    assert "scopes" in bad.stderr


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@pytest.mark.timeout(600)
def test_ten_thousand_recipients_stream_to_disk(world):
    mta, api, _ = world
    filler = "x" * 20_000  # 20 KB a message: 200 MB if the 10,000 built messages were all kept
    recipients = [{"email": f"r{i}@remote.example", "substitutions": {"n": i}} for i in range(10_000)]
    rss_before = _rss_kb(mta.proc.pid)
    status, body, _ = api.call("POST", "/api/v1/inject", {
        "envelope_sender": "bulk@example.org", "recipients": recipients, "substitutions": {"filler": filler},
        "content": {"from": "bulk@example.org", "subject": "n {{ n }}", "text_body": "{{ filler }} {{ n }}"},
        "deliver_after": "2099-01-01T00:00:00Z"}, token=INJECT, timeout=500)  # fmt: skip
    assert status == 200, str(body)[:500]
    assert body["success_count"] == 10_000, str(body)[:500]
    assert body["fail_count"] == 0, str(body)[:500]
    assert len(set(body["queue_ids"])) == 10_000
    grown_mb = (_rss_kb(mta.proc.pid) - rss_before) / 1024
    assert grown_mb < 120, f"RSS grew {grown_mb:.0f} MB"
    page = api.call("GET", "/api/v1/queue/messages?domain=remote.example&limit=5")[1]
    assert len(page["messages"]) == 5
    assert page["next_cursor"]


def test_metrics_count_mail_accepted_by_a_listener_worker(tmp_path):
    import signal

    api_port = free_port()
    mta = MTAProcess(str(tmp_path), smtp_extra="processes = 2", extra_config=f"""
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        """).start()  # fmt: skip
    try:
        wait_for_port("127.0.0.1", api_port, 30)
        api = Client(api_port)
        mta.wait_for(lambda: len(mta.children()) == 1, what="one listener worker")
        os.kill(mta.proc.pid, signal.SIGSTOP)  # only the worker can accept now
        try:
            for _ in range(3):
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
                    client.sendmail("s@example.org", ["bob@example.test"], "Subject: w\r\n\r\nx\r\n")
        finally:
            os.kill(mta.proc.pid, signal.SIGCONT)
        mta.wait_for(lambda: _metric(api, 'pymta_messages_received_total{listener="smtp"}') == 3, what="3 counted")
    finally:
        mta.stop()


def test_tagged_mail_offers_the_https_one_click_uri_first():
    from pymta.envelope import Envelope, Recipient
    from pymta.feedback.gate import FeedbackGate
    from pymta.feedback.verp import Tagger

    tagger = Tagger(SECRET, "bounces.example.test")
    gate = FeedbackGate(None, None, tagger, (), None, True, "https://mail.example.test/")
    envelope = Envelope(qid="0123456789ABCDEF", sender="news@Example.org", recipients=[Recipient("r@remote.example")])
    headers = gate.unsubscribe_headers(envelope, "r@remote.example")
    m = re.match(r"List-Unsubscribe: <https://mail\.example\.test/u/([^>]+)>,\r\n <mailto:u-[^>]+>\r\n"
                 r"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n$", headers)  # fmt: skip
    assert m, headers
    assert tagger.parse_unsubscribe_token(m.group(1)) == ("0123456789ABCDEF", "r@remote.example", "example.org")
    assert tagger.parse_unsubscribe_token(m.group(1).replace("0123", "0124")) is None
    assert Tagger("another-secret-0123456789", "bounces.example.test").parse_unsubscribe_token(m.group(1)) is None


def test_a_template_that_tries_to_leave_the_sandbox_fails_its_recipient_cleanly(world):
    _, api, _ = world
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    status, body, _ = api.call("POST", "/api/v1/inject", {
        "envelope_sender": "news@example.org",
        "recipients": [{"email": "bob@example.test", "substitutions": {"x": 1}}],
        "content": {"from": "news@example.org", "subject": "s", "text_body": escape}}, token=INJECT)  # fmt: skip
    assert status == 200, body
    assert body["success_count"] == 0, body
    [failure] = body["failed_recipients"]
    assert failure["email"] == "bob@example.test"
    assert failure["reason"].startswith("template error: text_body: ")
    assert "SecurityError" in failure["reason"] or "unsafe" in failure["reason"], failure
    assert api.call("GET", "/healthz", token=None)[0] == 200
