"""The tracking endpoints of the public listener: ``GET /t/c/TOKEN`` (302 to the signed URL, a
``click`` event) and ``GET /t/o/TOKEN.gif`` (a 1x1 GIF with no-cache headers, an ``open``
event). A forged or altered token gets 404, so the redirector is never an open redirect."""

from __future__ import annotations

import base64
from typing import Any

from twisted.logger import Logger
from twisted.web import resource, server

from pymta.events.tracking import CLICK, OPEN, TrackingTokens, is_machine

log = Logger(namespace="pymta.events.tracking")

GIF = base64.b64decode(b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_NO_CACHE = ((b"Cache-Control", b"no-cache, no-store, must-revalidate, private, max-age=0"), (b"Pragma", b"no-cache"),
             (b"Expires", b"0"))  # fmt: skip


class Tracking(resource.Resource):
    isLeaf = True

    def __init__(self, tokens: TrackingTokens, events: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.tokens = tokens
        self.events = events

    def render_GET(self, request: Any) -> Any:
        parts = request.postpath
        if len(parts) != 2 or parts[0] not in (b"c", b"o") or len(parts[1]) > 4200:
            return self._not_found(request)
        kind = CLICK if parts[0] == b"c" else OPEN
        token = parts[1].decode("ascii", "replace")
        if kind == OPEN:
            if not token.endswith(".gif"):
                return self._not_found(request)
            token = token[:-4]
        found = self.tokens.parse(kind, token)
        if found is None:
            return self._not_found(request)
        qid, recipient, url = found
        agent = (request.getHeader(b"user-agent") or b"")[:512].decode("latin-1")
        fields: dict[str, Any] = {"qid": qid, "recipient": recipient, "machine": is_machine(agent), "user_agent": agent}
        if kind == CLICK:
            fields["url"] = url
        self.events.emit("click" if kind == CLICK else "open", **fields)
        d = self.events.synced()
        d.addErrback(lambda f: log.error("tracking event not on disk: {why}", why=f.getErrorMessage()))
        d.addCallback(lambda _: self._answer(request, kind, url))
        return server.NOT_DONE_YET

    def _answer(self, request: Any, kind: str, url: str) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        for name, value in _NO_CACHE:
            request.setHeader(name, value)
        if kind == CLICK:
            request.setResponseCode(302)
            request.setHeader(b"Location", url.encode("utf-8"))
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Referrer-Policy", b"no-referrer")
            request.write(b"")
        else:
            request.setHeader(b"Content-Type", b"image/gif")
            request.write(GIF)
        request.finish()

    def _not_found(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return b"Not found\n"
