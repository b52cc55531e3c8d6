"""The dashboard in a real browser: pymta relays mail to a receiver on loopback (some accepted,
some refused with 550), then Debian's headless ``chromium`` (driven over the DevTools protocol
on a pipe) logs in through the form, and the plots must have drawn the data that was sent. The
same run checks ``GET /api/v1/reports`` against ``pymta-report --json``."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pymta.admin.http.tokens import digest
from tests.dnsserver import DNSServer, Zone
from tests.mta_process import MTAProcess, free_port, wait_for_port
from tests.smtp_receiver import ScriptedReceiver

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.timeout(240)
READ = "read-token-0123456789abcdefghijklmnopqrstu"
INJECT = "inject-token-0123456789abcdefghijklmnopq"
GOOD = [f"good{i}@ok.test" for i in range(4)]
BAD = ["bad0@ok.test", "bad1@ok.test"]


class Receiver(ScriptedReceiver):
    """An SMTP receiver on 127.0.0.9: RCPT to bad* answers 550 5.1.1, everything else 250."""

    accept_for = 600.0
    name = b"sink"
    ehlo_keywords = ()

    def __init__(self, port: int) -> None:
        self.accepted: list[str] = []
        super().__init__("127.0.0.9", port)

    def on_mail(self, sender: str, peer: str) -> bytes:
        return b"250 2.1.0 ok"

    def on_rcpt(self, address: str, peer: str) -> bytes:
        if address.startswith("bad"):
            return b"550 5.1.1 <" + address.encode() + b">: user unknown"
        return b"250 2.1.5 ok"

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        with self.lock:
            self.accepted += recipients
        return b"250 2.0.0 queued"


class Browser:
    """Headless chromium driven over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, profile: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends become fds 3 and 4, whatever numbers they had
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={profile}", "--window-size=1280,2400", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(profile, "..", "chromium.stderr"), "wb"),  # noqa: SIM115 (kept open beyond this block)
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._buffer = b""
        self.session: str | None = None

    def call(self, method: str, seconds: float = 30.0, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + seconds
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    assert "error" not in reply, reply
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"chromium did not answer {method}"
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 30.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except AssertionError:  # navigating: the context went away
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting in the page for {expression}")

    def screenshot(self, path: str) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        with open(path, "wb") as f:
            f.write(data)
        return data

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def world(tmp_path):
    port = free_port("127.0.0.9")
    dns = DNSServer(Zone({
        "ok.test": {"MX": ["10 mx.bigmail.test."]},
        "mx.bigmail.test": {"A": ["127.0.0.9"]},
    })).start()  # fmt: skip
    receiver = Receiver(port)
    tokens = tmp_path / "api-tokens"
    tokens.write_text(f"dash:read:{digest(READ)}\ncrm:inject:{digest(INJECT)}\n")
    api_port = free_port()
    mta = MTAProcess(str(tmp_path), dns=dns.address, smtp_port=port, extra_config=f"""
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        tokens_file = "{tokens}"
        [shaping.provider.bigmail]
        mx_suffix = ["bigmail.test"]
        [stats]
        retention = "2d"
        """).start()  # fmt: skip
    wait_for_port("127.0.0.1", api_port, 30)
    yield mta, receiver, api_port
    mta.stop()
    receiver.stop()
    dns.stop()


def _accounting(mta: MTAProcess) -> list[dict]:
    path = os.path.join(mta.state_dir, "log", "accounting.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_dashboard_plots_what_was_sent_in_a_real_browser(tmp_path, world):
    mta, receiver, api_port = world
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        for rcpt in GOOD + BAD:
            client.sendmail("", [rcpt], b"Subject: hello\r\n\r\nhello\r\n")
    mta.wait_for(lambda: sorted(receiver.accepted) == GOOD, 60, "delivery at the receiver")
    mta.wait_for(lambda: sum(r["event"] == "bounced" for r in _accounting(mta)) == len(BAD), 60, "the bounces")

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    browser = Browser(str(profile))
    try:
        browser.open(f"http://127.0.0.1:{api_port}/")
        browser.wait_for("document.querySelector('input[name=token]') !== null")
        assert browser.evaluate("document.querySelector('#flow')") is None  # nothing without logging in
        browser.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(READ)};"
                         "document.querySelector('form').submit(); true")  # fmt: skip
        browser.wait_for("document.querySelector('#flow') !== null")
        drawn = browser.evaluate("""JSON.stringify((() => {
            const out = {};
            for (const chart of document.querySelectorAll('#flow svg.chart')) {
              const per = {};
              for (const pt of chart.querySelectorAll('circle.pt'))
                per[pt.dataset.series] = (per[pt.dataset.series] || 0) + Number(pt.dataset.v);
              out[chart.getAttribute('aria-label')] = per;
            }
            const totals = {};
            for (const td of document.querySelectorAll('#totals td')) totals[td.dataset.total] = Number(td.textContent);
            return {charts: out, totals: totals, http_only: document.cookie,
                    queue: document.querySelectorAll('#queue circle.pt, #queue polyline').length,
                    reasons: [...document.querySelectorAll('#reasons td')].map(td => td.textContent),
                    providers: [...document.querySelectorAll('#rates-provider td')].map(td => td.textContent)};
        })())""")  # fmt: skip
        page = json.loads(drawn)
        shot = browser.screenshot(str(tmp_path / "dashboard.png"))
    finally:
        browser.close()
    assert shot.startswith(b"\x89PNG")
    assert len(shot) > 10_000
    overall = page["charts"]["all destinations, per 1 min"]
    assert overall == {"delivered": len(GOOD), "bounced": len(BAD)}
    assert page["charts"]["provider bigmail"] == {"delivered": len(GOOD), "bounced": len(BAD)}
    assert page["totals"]["received"] == len(GOOD + BAD)
    assert page["totals"]["delivered"] == len(GOOD)
    assert page["totals"]["bounced"] == len(BAD)
    assert page["http_only"] == ""  # the login cookie is not visible to scripts
    assert page["queue"] > 0  # the queue depth was sampled and drawn
    assert str(len(BAD)) in page["reasons"]
    assert page["providers"][:2] == ["bigmail", str(len(GOOD))]

    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/v1/reports?since=1h&by=provider",
                                     headers={"Authorization": f"Bearer {READ}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as resp:
        api = json.loads(resp.read())
    [group] = api["groups"]
    assert group["group"] == "bigmail"
    assert group["delivered"] == len(GOOD)
    assert group["bounced_hard"] == len(BAD)
    assert group["sent"] == len(GOOD + BAD)
    assert group["delivery_rate"] == round(len(GOOD) / len(GOOD + BAD), 4)
    cli = subprocess.run([sys.executable, "-m", "pymta.stats.report", "--config", mta.config_path, "--since", "1h",
                          "--by", "provider", "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["groups"] == api["groups"]
    assert printed["total"] == api["total"]


def _get(port: int, path: str, headers: dict[str, str] | None = None, data: bytes | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_the_dashboard_needs_a_read_token_and_reports_refuse_bad_parameters(world):
    _mta, _receiver, port = world
    status, headers, body = _get(port, "/")
    assert status == 200
    assert b'name="token"' in body
    assert b"<svg" not in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    status, _, body = _get(port, "/login", data=b"token=" + INJECT.encode())  # no read scope
    assert status == 401
    assert b"not valid" in body
    status, headers, _ = _get(port, "/login", data=b"token=" + READ.encode())
    assert status == 303
    assert headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    status, _, body = _get(port, "/?range=week", {"Cookie": cookie.split(";")[0]})
    assert status == 200
    assert b'id="flow"' in body
    assert b"Last week" in body
    status, _, body = _get(port, "/", {"Authorization": f"Bearer {READ}"})
    assert status == 200
    assert b'id="flow"' in body
    status, _, body = _get(port, "/", {"Cookie": "pymta_token=forged"})
    assert status == 200
    assert b'id="flow"' not in body
    # The cookie opens the page only, never the JSON API.
    status, _, _ = _get(port, "/api/v1/reports", {"Cookie": cookie.split(";")[0]})
    assert status == 401
    auth = {"Authorization": f"Bearer {READ}"}
    status, _, body = _get(port, "/api/v1/reports?since=soon", auth)
    assert status == 400
    assert json.loads(body)["field"] == "since"
    status, _, body = _get(port, "/api/v1/reports?by=planet", auth)
    assert status == 400
    assert json.loads(body)["field"] == "by"
    status, _, body = _get(port, "/api/v1/reports?since=7d&by=day", auth)
    assert status == 200
    assert json.loads(body)["total"]["sent"] == 0
