"""The public listener: RFC 8058 one-click unsubscribe over HTTPS (no token needed; the signed
path is the credential).

``POST /u/TOKEN`` (the receiver's one-click request, body ``List-Unsubscribe=One-Click``)
suppresses exactly the recipient the token was made for, for the sender domain it names;
``GET /u/TOKEN`` only shows a page with a button that POSTs (link scanners fetch with GET, so a
GET never unsubscribes). A forged or altered token gets 404.
"""

from __future__ import annotations

import html
from typing import Any, cast

from twisted.logger import Logger
from twisted.web import resource
from twisted.web.resource import IResource

log = Logger(namespace="pymta.feedback")

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family:sans-serif;max-width:36em;margin:3em auto">{body}</body></html>"""


def page(title: str, body: str) -> bytes:
    return _PAGE.format(title=html.escape(title), body=body).encode("utf-8")


class Unsubscribe(resource.Resource):
    isLeaf = True

    def __init__(self, tagger: Any, suppression: Any, events: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.tagger = tagger
        self.suppression = suppression
        self.events = events  # the event journal: an ``unsubscribe`` event

    def _target(self, request: Any) -> tuple[str, str, str] | None:
        parts = request.postpath
        if len(parts) != 1 or len(parts[0]) > 1200:
            return None
        return cast("tuple[str, str, str] | None", self.tagger.parse_unsubscribe_token(parts[0].decode("ascii", "replace")))

    def _answer(self, request: Any, status: int, title: str, body: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'")
        return page(title, body)

    def render_GET(self, request: Any) -> bytes:
        target = self._target(request)
        if target is None:
            return self._answer(request, 404, "Not found", "<p>This unsubscribe link is not valid.</p>")
        _, recipient, scope = target
        who = html.escape(recipient)
        sender = f" from {html.escape(scope)}" if scope else ""
        return self._answer(request, 200, "Unsubscribe", (
            f"<p>Unsubscribe <b>{who}</b>{sender}?</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        ))  # fmt: skip

    def render_POST(self, request: Any) -> bytes:
        target = self._target(request)
        if target is None:
            return self._answer(request, 404, "Not found", "<p>This unsubscribe link is not valid.</p>")
        qid, recipient, scope = target
        self.suppression.add(recipient, "one-click unsubscribe", "unsubscribe", scope or None)
        log.info("feedback for {rcpt}: unsubscribe over HTTPS -> suppressed for {scope}", rcpt=recipient,
                 scope=scope or "all", qid=qid, kind="unsubscribe")  # fmt: skip
        if self.events is not None:
            self.events.emit("unsubscribe", qid=qid, recipient=recipient, scope=scope or None, feedback="one-click")
        sender = f" from {html.escape(scope)}" if scope else ""
        return self._answer(request, 200, "Unsubscribed", f"<p>{html.escape(recipient)} is unsubscribed{sender}.</p>")


def public_root(tagger: Any, suppression: Any, events: Any = None, tracking: Any = None) -> resource.Resource:
    """``/u/`` (with a tagger) and ``/t/`` (with ``tracking``, a TrackingTokens, and the event journal)."""
    root = resource.Resource()
    if tagger is not None and suppression is not None:
        root.putChild(b"u", cast(IResource, Unsubscribe(tagger, suppression, events)))
    if tracking is not None and events is not None:
        from pymta.admin.http.tracking import Tracking

        root.putChild(b"t", cast(IResource, Tracking(tracking, events)))
    return root
