"""rspamd's HTTP protocol (``POST /checkv2``): the message as the body, the envelope as headers,
the JSON answer mapped to a :class:`pymta.inbound.scan.Verdict`.

Actions: ``reject`` -> 550 5.7.1 (rspamd's ``messages.smtp_message`` as the text when it gives
one), ``soft reject`` and ``greylist`` -> 451 4.7.1, ``add header`` -> ``X-Spam: Yes``,
``rewrite subject`` -> the new ``Subject:``, ``no action`` -> accept; the ``milter`` block's
``add_headers``/``remove_headers`` are applied as well (rspamd's own milter semantics).
The answer is read up to :data:`MAX_ANSWER` octets; anything that is not that JSON is an error
(the scanner's ``on_error`` then applies).
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from pymta.httpbody import BytesProducer, LimitedBody
from pymta.inbound.scan import (
    ACCEPT,
    REJECT,
    TEMPFAIL,
    HeaderEdit,
    ScanError,
    ScanRequest,
    Verdict,
    scanner_reply,
)

MAX_ANSWER = 1 << 20


class RspamdScanner:
    """``[scan] rspamd = "http://127.0.0.1:11333"``."""

    def __init__(self, url: str, reactor: Any, timeout: float, on_error: str, agent: Any = None) -> None:
        self.name = "rspamd"
        self.url = url.rstrip("/") + "/checkv2"
        self.timeout = timeout
        self.on_error = on_error
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        # An IAgent: mypy reads a zope Interface's methods without ``self``, and sees no @implementer.
        self.agent: Any = agent or Agent(reactor, connectTimeout=max(1, int(timeout)), pool=pool)
        self.pool = pool

    def scan(self, request: ScanRequest) -> defer.Deferred[Any]:
        headers = Headers()
        for name, value in _envelope_headers(request):
            headers.addRawHeader(name, value.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b""))
        d: defer.Deferred[Any] = self.agent.request(b"POST", self.url.encode(), headers, BytesProducer(request.message))
        d.addCallback(self._answer)
        return d

    def _answer(self, response: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        response.deliverBody(LimitedBody(done, MAX_ANSWER, ScanError, "rspamd answer"))
        if response.code != 200:
            return done.addCallback(lambda body: _fail(f"rspamd answered HTTP {response.code}: {body[:200]!r}"))
        return done.addCallback(verdict_from_answer)

    def close(self) -> defer.Deferred[Any]:
        return cast("defer.Deferred[Any]", self.pool.closeCachedConnections())


def _fail(why: str) -> None:
    raise ScanError(why)


def _envelope_headers(req: ScanRequest) -> list[tuple[str, str]]:
    out = [("Queue-Id", req.qid), ("From", req.sender), ("Helo", req.helo or ""), ("MTA-Name", req.hostname),
           ("Hostname", req.client_name or "unknown")]  # fmt: skip
    if req.client_address:
        out.append(("IP", req.client_address))
    out.extend(("Rcpt", r) for r in req.recipients)
    if req.auth_user:
        out.append(("User", req.auth_user))
    if req.tls:
        out.append(("TLS-Version", req.tls.partition(" ")[0]))
        out.append(("TLS-Cipher", req.tls.partition(" ")[2]))
    return out


def verdict_from_answer(body: bytes) -> Verdict:
    """rspamd's /checkv2 JSON answer as a Verdict."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ScanError(f"rspamd answer is not JSON: {body[:100]!r}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("action"), str):
        raise ScanError("rspamd answer has no action")
    action = answer["action"]
    messages: Any = answer.get("messages") if isinstance(answer.get("messages"), dict) else {}
    text = messages.get("smtp_message") if isinstance(messages.get("smtp_message"), str) else ""
    if action == "reject":
        return Verdict(REJECT, scanner_reply(550, "5.7.1", text or "Spam message rejected", REJECT))
    if action in ("soft reject", "greylist"):
        return Verdict(TEMPFAIL, scanner_reply(451, "4.7.1", text or "Try again later", TEMPFAIL))
    edits: list[HeaderEdit] = []
    milter: Any = answer.get("milter") if isinstance(answer.get("milter"), dict) else {}
    removes: Any = milter.get("remove_headers") if isinstance(milter.get("remove_headers"), dict) else {}
    for name, count in removes.items():
        occurrences = count if isinstance(count, int) and count > 0 else 1
        edits.extend(HeaderEdit("change", str(name), "", 1) for _ in range(min(occurrences, 20)))
    adds: Any = milter.get("add_headers") if isinstance(milter.get("add_headers"), dict) else {}
    for name, value in adds.items():
        values = value if isinstance(value, list) else [value]
        for v in values[:20]:
            if isinstance(v, dict):
                v = v.get("value")
            if isinstance(v, str):
                edits.append(HeaderEdit("add", str(name), v))
    if action == "add header" and "X-Spam" not in adds:
        edits.append(HeaderEdit("add", "X-Spam", "Yes"))
    elif action == "rewrite subject" and isinstance(answer.get("subject"), str):
        edits.append(HeaderEdit("change", "Subject", answer["subject"], 1))
    elif action not in ("no action", "add header", "rewrite subject"):
        raise ScanError(f"rspamd action {action!r} unknown")
    return Verdict(ACCEPT, edits=edits)
