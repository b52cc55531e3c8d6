"""A small JSON API on ``twisted.web``: routes, bearer-token scopes, bounded bodies, JSON errors.

Every answer is JSON; every failure is ``{"error": ..., "field": ...}`` with the right status,
and no traceback ever reaches a client (an unexpected exception is logged and answered 500).
Request bodies over the limit are refused with 413 without being kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from pymta.admin.http.tokens import TokenChecker

log = Logger(namespace="pymta.http")


class APIError(Exception):
    """An answer other than success: HTTP status, message and (optionally) the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class LimitedRequest(server.Request):
    """A request whose body may not exceed ``channel.site.max_body`` octets: a larger one is
    dropped as it arrives and answered 413."""

    too_large = False

    def _limit(self) -> int:
        limit: int = getattr(cast(Any, self.channel).site, "max_body", 1 << 20)  # set by Site.buildProtocol
        return limit

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.too_large = True
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]  # untyped in Twisted
        self._received = 0

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received = getattr(self, "_received", 0) + len(data)
        if self._received > self._limit():
            self.too_large = True
            content = cast(IO[bytes], self.content)  # set by gotLength, before any chunk
            content.seek(0)
            content.truncate()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]  # untyped in Twisted


def send_json(request: Any, status: int, body: Any) -> None:
    data = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", str(len(data)).encode())
    request.write(data)
    request.finish()


Handler = Callable[..., Any]


class Route:
    def __init__(self, method: str, pattern: str, handler: Handler, scope: str | None) -> None:
        self.method = method
        self.regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]{1,200})", pattern) + "$")
        self.handler = handler
        self.scope = scope


class JSONAPI(resource.Resource):
    """Dispatches ``METHOD /path`` to handlers ``handler(request, **path_parts)`` that return a
    JSON-able value (or a Deferred of one) or raise :class:`APIError`."""

    isLeaf = True

    def __init__(self, tokens: TokenChecker | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.tokens = tokens
        self.routes: list[Route] = []

    def route(self, method: str, pattern: str, handler: Handler, scope: str | None) -> None:
        """``scope`` None: no token needed (health)."""
        self.routes.append(Route(method, pattern, handler, scope))

    def render(self, request: Any) -> Any:
        request.notifyFinish().addErrback(lambda _: setattr(request, "gone", True))
        d = defer.maybeDeferred(self._dispatch, request)
        d.addCallbacks(lambda body: self._ok(request, body), lambda f: self._failed(request, f))
        return server.NOT_DONE_YET

    def _dispatch(self, request: Any) -> Any:
        if getattr(request, "too_large", False):
            raise APIError(413, "request body too large")
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        allowed = []
        for route in self.routes:
            m = route.regex.match(path)
            if not m:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            if route.scope is not None:
                self.authorise(request, route.scope)
            return route.handler(request, **m.groupdict())
        if allowed:
            request.setHeader(b"Allow", ", ".join(sorted(set(allowed))).encode())
            raise APIError(405, f"method {method} not allowed here")
        raise APIError(404, "no such resource")

    def authorise(self, request: Any, scope: str) -> Any:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1").strip()
        kind, _, presented = header.partition(" ")
        token = self.tokens.check(presented.strip()) if self.tokens and kind.lower() == "bearer" and presented else None
        if token is None:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="pymta"')
            raise APIError(401, "a valid bearer token is needed")
        if not token.allows(scope):
            raise APIError(403, f"token {token.name!r} lacks the {scope!r} scope")
        request.token_name = token.name
        return token

    def _ok(self, request: Any, body: Any) -> None:
        if request.finished or getattr(request, "gone", False):
            return
        status = 200
        if isinstance(body, tuple):
            status, body = body
        send_json(request, status, body)

    def _failed(self, request: Any, failure: Failure) -> None:
        if failure.check(APIError):
            error = cast(APIError, failure.value)
        else:
            log.failure("HTTP request {method} {path} failed", failure, method=request.method, path=request.path)
            error = APIError(500, "internal error")
        if request.finished or getattr(request, "gone", False):
            return
        send_json(request, error.status, error.body())


def json_body(request: Any) -> Any:
    """The request body as JSON (400 naming the problem otherwise)."""
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise APIError(415, "the body must be application/json")
    request.content.seek(0)
    raw = request.content.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


def query(request: Any, name: str, default: str | None = None) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return default
    value: str = values[0].decode("utf-8", "replace")
    return value


def query_int(request: Any, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = query(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, f"{name} must be an integer", name) from None
    if not minimum <= value <= maximum:
        raise APIError(400, f"{name} must be between {minimum} and {maximum}", name)
    return value


class APISite(server.Site):
    """A Site with bounded request bodies and no per-request access-log noise at info."""

    requestFactory = LimitedRequest

    def __init__(self, root: Any, max_body: int, reactor: Any = None, timeout: float = 60.0) -> None:
        super().__init__(root, reactor=reactor)  # type: ignore[no-untyped-call]  # untyped in Twisted
        self.max_body = max_body
        self.timeOut = timeout
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        log.debug("{method} {uri} {code}", method=request.method, uri=request.uri, code=request.code)


STATUS_TEXT = http.RESPONSES
