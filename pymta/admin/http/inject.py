"""``POST /api/v1/inject``: a message (built from parts, or raw RFC 5322) for many recipients,
each with its own substitutions, queued exactly as SMTP queues mail.

Messages are built with the stdlib ``email`` package (multipart/alternative, attachments,
RFC 2047/2231 encodings, Message-ID, Date). Templates use Jinja2's ``SandboxedEnvironment``
(a template cannot reach Python objects) with undefined variables as errors; a template that
fails for one recipient fails that recipient, not the batch. Rendering runs on its own thread,
a chunk of recipients per hop to it (CHUNK, at most CHUNK_BYTES of output), each recipient
bounded in time (a runaway template is interrupted) and in output size.

Recipients are validated as RCPT TO is, suppressed ones fail with the reason, and each built
message is handed to the queue in small groups (one call and one directory fsync a group, a
few groups written at once) before the next chunk is built, so 10,000 recipients never sit in memory as
built messages. The answer comes only once every accepted message is on disk.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import Address
from email.message import MIMEPart
from email.policy import SMTP
from email.utils import formataddr, make_msgid
from typing import Any, cast

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.admin.http.jsonapi import APIError, json_body
from pymta.dates import header_date
from pymta.envelope import ROUTE_FEEDBACK, Envelope, Recipient, new_qid
from pymta.inbound.submit import leave_records_to_pickup, record_queued
from pymta.interfaces import QueueError, QueueFull
from pymta.smtp.syntax import parse_path

log = Logger(namespace="pymta.http.inject")

MAX_RECIPIENTS = 10_000
GROUP, GROUP_BYTES = 16, 1 << 20  # messages handed to the queue in one call (one directory fsync)
GROUPS_IN_FLIGHT = 4  # groups being written at once
CHUNK = 64  # recipients built per hop to the rendering thread
CHUNK_BYTES = 4 << 20  # built messages held at once (a chunk ends early past this)
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext
_RESERVED_HEADERS = {
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "reply-to", "mime-version",
    "content-type", "content-transfer-encoding", "received", "return-path",
}  # fmt: skip


class TemplateError(Exception):
    """Rendering failed for one recipient; the text says why."""


@dataclass
class InjectRequest:
    sender: str
    recipients: list[dict[str, Any]]
    content: Any
    substitutions: dict[str, Any] = field(default_factory=dict)
    campaign: str | None = None
    tenant: str | None = None
    pool: str | None = None
    not_before: float = 0.0
    track: dict[str, bool] | None = None  # {"opens": bool, "clicks": bool} given with the request


def _string(value: Any, name: str, limit: int = 998, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise APIError(400, f"{name} is required", name)
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a string", name)
    if len(value) > limit:
        raise APIError(400, f"{name} is longer than {limit} characters", name)
    if limit <= 998 and ("\r" in value or "\n" in value):
        raise APIError(400, f"{name} must not contain line breaks", name)
    return value


def _mailbox(value: Any, name: str) -> tuple[str, str]:
    """(address, display name) from ``"a@b"`` or ``{"email": "a@b", "name": "A"}``."""
    display = ""
    if isinstance(value, dict):
        display = _string(value.get("name"), f"{name}.name", 200) or ""
        value = value.get("email")
        name = f"{name}.email"
    address = _string(value, name, 320, required=True)
    try:
        parsed = parse_path(f"<{address}>", utf8=True)
    except ValueError as e:
        raise APIError(400, f"{name}: {e}", name) from None
    if not parsed:
        raise APIError(400, f"{name}: an address is needed", name)
    return parsed, display


def parse_request(body: Any) -> InjectRequest:
    if not isinstance(body, dict):
        raise APIError(400, "expected a JSON object")
    known = {"envelope_sender", "recipients", "content", "substitutions", "campaign", "tenant", "pool",
             "deliver_after", "track"}  # fmt: skip
    for key in body:
        if key not in known:
            raise APIError(400, f"unknown field {key!r}", key)
    sender = _string(body.get("envelope_sender"), "envelope_sender", 320, required=True)
    try:
        sender = parse_path(f"<{sender}>", utf8=True)
    except ValueError as e:
        raise APIError(400, f"envelope_sender: {e}", "envelope_sender") from None
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise APIError(400, "recipients must be a non-empty list", "recipients")
    if len(recipients) > MAX_RECIPIENTS:
        raise APIError(400, f"at most {MAX_RECIPIENTS} recipients per request", "recipients")
    for i, r in enumerate(recipients):
        if not isinstance(r, dict | str):
            raise APIError(400, "a recipient is an object with email (or a string)", f"recipients[{i}]")
        if isinstance(r, dict):
            for key in ("substitutions", "metadata"):
                if r.get(key) is not None and not isinstance(r.get(key), dict):
                    raise APIError(400, f"{key} must be an object", f"recipients[{i}].{key}")
    content = body.get("content")
    if not isinstance(content, dict | str):
        raise APIError(400, "content must be an object or a raw RFC 5322 message string", "content")
    substitutions = body.get("substitutions") or {}
    if not isinstance(substitutions, dict):
        raise APIError(400, "substitutions must be an object", "substitutions")
    not_before = 0.0
    if body.get("deliver_after") is not None:
        when = _string(body.get("deliver_after"), "deliver_after", 64)
        try:
            not_before = datetime.fromisoformat(cast(str, when).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise APIError(400, "deliver_after must be an ISO 8601 time", "deliver_after") from None
    track = body.get("track")
    if track is not None and (not isinstance(track, dict) or set(track) - {"opens", "clicks"}
                              or not all(isinstance(v, bool) for v in track.values())):  # fmt: skip
        raise APIError(400, 'track must be an object like {"opens": true, "clicks": true}', "track")
    return InjectRequest(
        track=track,
        sender=sender,
        recipients=recipients,
        content=content,
        substitutions=substitutions,
        campaign=_string(body.get("campaign"), "campaign", 200),
        tenant=_string(body.get("tenant"), "tenant", 200),
        pool=_string(body.get("pool"), "pool", 200),
        not_before=not_before,
    )


# -- templates ------------------------------------------------------------------------------


class Templates:
    """The content's templates compiled once per request (syntax errors: 400 naming the field)."""

    def __init__(self, content: dict[str, Any], max_output: int) -> None:
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import SandboxedEnvironment

        self.max_output = max_output
        plain = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        html = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True)
        self.compiled: dict[str, Any] = {}
        for name, env, limit in (("subject", plain, 998), ("text_body", plain, 10_000_000),
                                 ("html_body", html, 10_000_000)):  # fmt: skip
            source = content.get(name)
            if source is None:
                continue
            if not isinstance(source, str) or len(source) > limit:
                raise APIError(400, f"content.{name} must be a string of at most {limit} characters", f"content.{name}")
            try:
                self.compiled[name] = env.from_string(source)
            except TemplateSyntaxError as e:
                raise APIError(400, f"content.{name}: template syntax error line {e.lineno}: {e.message}",
                               f"content.{name}") from None  # fmt: skip

    def render(self, name: str, variables: dict[str, Any]) -> str | None:
        template = self.compiled.get(name)
        if template is None:
            return None
        out: list[str] = []
        size = 0
        try:
            for chunk in template.generate(variables):
                size += len(chunk)
                if size > self.max_output:
                    raise TemplateError(f"{name}: rendered output over {self.max_output} characters")
                out.append(chunk)
        except (TemplateError, RenderTimeout):
            raise
        except Exception as e:  # any template failure is this recipient's, with its text
            raise TemplateError(f"{name}: {type(e).__name__}: {e}") from None
        return "".join(out)


class RenderTimeout(Exception):
    """Raised inside the rendering thread when a template runs past its time."""


class BoundedRenderer:
    """Runs rendering on one dedicated thread, many jobs a call (one hop to the thread for a
    whole chunk of recipients). A job that runs past ``timeout`` seconds gets :class:`RenderTimeout`
    raised inside it (templates are Python code, so the interruption lands between bytecodes) and
    fails alone; the jobs after it go on. Time is the reactor's, checked every quarter timeout."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        from twisted.python.threadpool import ThreadPool

        self.reactor = reactor
        self.timeout = timeout
        self.pool = ThreadPool(1, 1, name="pymta-render")
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``f(*args)`` on the rendering thread; its result, or its exception as the failure."""

        def one(results: list[Any]) -> Any:
            if isinstance(results[0], BaseException):
                raise results[0]
            return results[0]

        return self.run_each(f, [args]).addCallback(one)

    def run_each(self, f: Callable[..., Any], jobs: list[tuple[Any, ...]], max_bytes: int = 0) -> defer.Deferred[list[Any]]:
        """``f(*args)`` for the ``args`` of each job in order: the list of results, an exception
        (:class:`RenderTimeout` for an interrupted job) in the place of a job that raised one.
        With ``max_bytes``, the call ends once the results (bytes) add up to that much: the list
        is then shorter than ``jobs``, and the caller hands in the rest again."""
        results: list[Any] = []
        state: dict[str, Any] = {"job": -1, "thread": None, "done": False}

        def call() -> list[Any]:
            state["thread"] = threading.get_ident()
            size = 0
            try:
                while len(results) < len(jobs) and not (max_bytes and size >= max_bytes):
                    state["job"] = i = len(results)
                    try:
                        outcome = f(*jobs[i])
                    except Exception as e:  # this job's: TemplateError, RenderTimeout or a fault the caller raises
                        outcome = e
                    results.append(outcome)
                    if isinstance(outcome, bytes | tuple):
                        size += len(outcome[0] if isinstance(outcome, tuple) else outcome)
            finally:
                state["done"] = True
            return results

        seen: dict[str, Any] = {"job": -1, "at": 0.0}

        def watch() -> None:
            if state["done"]:
                return
            job, now = state["job"], self.reactor.seconds()
            if job != seen["job"]:
                seen.update(job=job, at=now)
            elif job >= 0 and now - seen["at"] >= self.timeout:
                seen["at"] = now  # one interruption per timeout
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(state["thread"]), ctypes.py_object(RenderTimeout))
            watchdog[0] = self.reactor.callLater(self.timeout / 4, watch)

        watchdog = [self.reactor.callLater(self.timeout / 4, watch)]
        d = threads.deferToThreadPool(self.reactor, self.pool, call)

        def finished(result: Any) -> Any:
            if watchdog[0].active():
                watchdog[0].cancel()
            if isinstance(result, Failure) and result.check(RenderTimeout):
                # The interruption landed between two jobs (the one it was meant for had just ended):
                # what is done stands, the rest goes on.
                rest = self.run_each(f, jobs[len(results) :], max_bytes)
                return rest.addCallback(lambda more: results + more)
            return result

        return d.addBoth(finished)


# -- building -------------------------------------------------------------------------------


def _attachments(content: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    items = content.get("attachments") or []
    if not isinstance(items, list):
        raise APIError(400, "content.attachments must be a list", "content.attachments")
    out = []
    for i, a in enumerate(items):
        where = f"content.attachments[{i}]"
        if not isinstance(a, dict):
            raise APIError(400, "an attachment is an object", where)
        name = cast(str, _string(a.get("file_name"), f"{where}.file_name", 255, required=True))
        ctype = cast(str, _string(a.get("content_type") or "application/octet-stream", f"{where}.content_type", 255))
        if not re.fullmatch(r"[a-zA-Z0-9!#$&^_.+-]{1,64}/[a-zA-Z0-9!#$&^_.+-]{1,64}", ctype):
            raise APIError(400, "content_type must be type/subtype", f"{where}.content_type")
        try:
            data = base64.b64decode(cast(str, _string(a.get("data"), f"{where}.data", 50_000_000, required=True)), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "data must be base64", f"{where}.data") from None
        out.append((name, ctype, data))
    return out


def check_headers(content: dict[str, Any]) -> dict[str, str]:
    headers = content.get("headers") or {}
    if not isinstance(headers, dict) or len(headers) > 100:
        raise APIError(400, "content.headers must be an object of at most 100 headers", "content.headers")
    for name, value in headers.items():
        where = f"content.headers.{name}"
        if not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise APIError(400, "not a header name that may be set here", where)
        _string(value, where, 998, required=True)
    return headers


class MessageBuilder:
    """Builds one recipient's message from the parts (everything checked once up front)."""

    def __init__(self, content: dict[str, Any], max_output: int, clock: Any) -> None:
        self.content = content
        self.clock = clock
        self.templates = Templates(content, max_output)
        if "subject" not in self.templates.compiled:
            raise APIError(400, "content.subject is required", "content.subject")
        if not ({"text_body", "html_body"} & set(self.templates.compiled)):
            raise APIError(400, "content needs text_body or html_body", "content")
        self.from_address, self.from_name = _mailbox(content.get("from"), "content.from")
        self.reply_to = _mailbox(content["reply_to"], "content.reply_to") if content.get("reply_to") else None
        self.headers = check_headers(content)
        self.attachments = _attachments(content)
        known = {"from", "reply_to", "subject", "text_body", "html_body", "headers", "attachments"}
        for key in content:
            if key not in known:
                raise APIError(400, f"unknown field content.{key}", f"content.{key}")
        # What every recipient's message shares is serialised once per request by the stdlib
        # (RFC 2047/2231 encodings included); per recipient only its own headers and parts are
        # assembled, which is what the stdlib's per-message header parsing made slow.
        shared = [("From", _format(self.from_address, self.from_name))]
        if self.reply_to:
            shared.append(("Reply-To", _format(*self.reply_to)))
        shared += list(self.headers.items())
        self._shared = b"".join(header_line(name, value) for name, value in shared)
        self._attachments = [_attachment_part(name, ctype, data) for name, ctype, data in self.attachments]

    def build(self, rcpt: str, rcpt_name: str, variables: dict[str, Any]) -> bytes:
        subject = self.templates.render("subject", variables) or ""
        text = self.templates.render("text_body", variables)
        html = self.templates.render("html_body", variables)
        head = [
            self._shared,
            header_line("To", _format(rcpt, rcpt_name)),
            header_line("Subject", " ".join(subject.split())),  # a subject is one line
            # Wall-clock time on purpose: the Date header states the time of composition.
            header_line("Date", header_date(self.clock.seconds(), localtime=True)),
            header_line("Message-ID", make_msgid(domain=self.from_address.rpartition("@")[2] or None)),
            b"MIME-Version: 1.0\r\n",
        ]
        parts = [_text_part("plain", text)] if text is not None else []
        if html is not None or text is None:
            parts.append(_text_part("html", html or ""))
        body = parts[0] if len(parts) == 1 else _multipart("alternative", parts)
        if self._attachments:
            body = _multipart("mixed", [body, *self._attachments])
        return b"".join(head) + body


_PLAIN_HEADER = re.compile(r"[ -~]*\Z")  # printable ASCII, nothing the stdlib would encode or fold


def header_line(name: str, value: str) -> bytes:
    """``Name: value`` CRLF; a value that needs RFC 2047 encoding or folding goes through the stdlib."""
    if len(name) + len(value) < 76 and "=?" not in value and _PLAIN_HEADER.match(value):
        return f"{name}: {value}\r\n".encode("ascii")
    return SMTP.fold_binary(*SMTP.header_store_parse(name, value))


def _text_part(subtype: str, text: str) -> bytes:
    """A text/* part as the stdlib would choose it: 7bit or 8bit when every line fits in 78
    octets, else quoted-printable (done in C by binascii)."""
    data = text.encode("utf-8")
    lines = data.splitlines() or [b""]
    if max(len(line) for line in lines) <= cast(int, SMTP.max_line_length):
        cte = "7bit" if data.isascii() else "8bit"
        encoded = b"\r\n".join(lines) + b"\r\n"
    else:
        cte = "quoted-printable"
        encoded = binascii.b2a_qp(b"\n".join(lines) + b"\n", istext=True).replace(b"\n", b"\r\n")
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
            .encode("ascii") + encoded)  # fmt: skip


def _attachment_part(name: str, ctype: str, data: bytes) -> bytes:
    """One attachment as a MIME part (headers and base64 body), serialised by the stdlib."""
    part = MIMEPart(policy=SMTP)
    maintype, subtype = ctype.split("/", 1)
    part.set_content(data, maintype=maintype, subtype=subtype, disposition="attachment", filename=name)
    return part.as_bytes(policy=SMTP)


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    # "=_" never occurs in base64 or quoted-printable text; 128 random bits rule out the rest.
    boundary = f"=_{secrets.token_hex(16)}".encode("ascii")
    out = [b'Content-Type: multipart/' + subtype.encode("ascii") + b'; boundary="' + boundary + b'"\r\n\r\n']
    for part in parts:  # the CRLF before a delimiter belongs to the delimiter, not to the part
        out += [b"--", boundary, b"\r\n", part, b"\r\n"]
    out += [b"--", boundary, b"--\r\n"]
    return b"".join(out)


def _format(address: str, name: str) -> str:
    if not name:
        return address
    local, _, domain = address.rpartition("@")
    try:
        return str(Address(display_name=name, username=local, domain=domain))
    except (ValueError, IndexError):
        return formataddr((name, address))


def _email_of(item: Any) -> str:
    return str(item.get("email") if isinstance(item, dict) else item)[:320]


def raw_message(content: str, limit: int) -> bytes:
    """A raw RFC 5322 message as given, line ends made CRLF; must have a header section."""
    data = content.encode("utf-8")
    if len(data) > limit:
        raise APIError(413, f"content over the message size limit of {limit} octets", "content")
    data = re.sub(rb"\r?\n|\r", b"\r\n", data)
    if not re.match(rb"^[!-9;-~]+:", data):
        raise APIError(400, "content does not start with a header field", "content")
    if b"\r\n\r\n" not in data:
        data += b"\r\n" if data.endswith(b"\r\n") else b"\r\n\r\n"
    return data


# -- the endpoint ---------------------------------------------------------------------------


class InjectAPI:
    """``POST /api/v1/inject``; ``policy`` decides recipients as RCPT TO does for a trusted client."""

    def __init__(
        self,
        store: Any,
        policy: Any,
        clock: Any,
        reactor: Any,
        hostname: str,
        max_message_size: int,
        suppression: Any = None,
        accounting: Any = None,
        on_queued: Callable[[str], Any] | None = None,
        records_at_pickup: bool = False,
        template_timeout: float = 2.0,
        metrics: Any = None,
        sign: Callable[..., defer.Deferred[Any]] | None = None,
        tracker: Callable[[bytes, Envelope, dict[str, bool] | None], bytes] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.reactor = reactor
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.suppression = suppression
        self.accounting = accounting
        self.on_queued = on_queued
        self.records_at_pickup = records_at_pickup  # see leave_records_to_pickup
        self.renderer = BoundedRenderer(reactor, template_timeout)
        self.metrics = metrics
        self.sign = sign  # DKIM (pymta.auth.accept.SenderAuth.sign): once, here, as for a trusted client
        self.tracker = tracker  # open/click tracking rewrite (pymta.events.tracking), before any signing
        self.closing = False

    def register(self, api: Any) -> None:
        api.route("POST", "/api/v1/inject", self.inject, "inject")

    def close(self) -> None:
        self.closing = True
        self.renderer.stop()

    def inject(self, request: Any) -> defer.Deferred[Any]:
        req = parse_request(json_body(request))
        builder = None
        raw = None
        if isinstance(req.content, dict):
            builder = MessageBuilder(req.content, self.max_message_size, self.clock)
        else:
            raw = raw_message(req.content, self.max_message_size)
        d = self._run(req, builder, raw, getattr(request, "token_name", "api"))
        if self.metrics is not None:
            d.addBoth(self.metrics.injected_result)
        return d

    def _recipient(self, req: InjectRequest, i: int, item: Any, token: str) -> tuple[str, Any, Any] | str:
        """(address, the policy's decision, item) for an acceptable recipient, else the reason it fails."""
        email = item.get("email") if isinstance(item, dict) else item
        if not isinstance(email, str) or len(email) > 320:
            return "not an address"
        try:
            address = parse_path(f"<{email}>", utf8=True)
        except ValueError as e:
            return f"5.1.3 bad address syntax: {e}"
        if not address:
            return "5.1.3 an address is needed"
        decision = self.policy.recipient(address, "", auth_user=f"api:{token}")
        if decision.reply is not None:
            return f"{decision.reply.enhanced} {decision.reply.text}"
        if decision.route == ROUTE_FEEDBACK:
            return "5.7.1 feedback addresses take no injected mail"
        if self.suppression is not None:
            entry = self.suppression.is_suppressed(decision.address, req.sender.rpartition("@")[2] or None)
            if entry is not None:
                return f"5.7.1 Recipient suppressed ({entry['source']}: {entry['reason']})"
        return decision.address, decision, item

    def _admit(self, req: InjectRequest, items: Any, token: str, failed: list[tuple[int, dict[str, str]]], seen: set[str],
               broken: list[str], count: int, named: bool) -> list[tuple[int, Envelope, str, dict[str, Any]]]:  # fmt: skip
        """The next ``count`` recipients that may have a message: (position, envelope, name,
        substitutions); the others go into ``failed`` with their reason."""
        chunk: list[tuple[int, Envelope, str, dict[str, Any]]] = []
        for i, item in items:
            if self.closing:  # the MTA is stopping: what is not queued yet is refused, for a retry
                failed.append((i, {"email": _email_of(item), "reason": "4.3.2 the MTA is shutting down"}))
                continue
            if broken:
                failed.append((i, {"email": _email_of(item), "reason": "4.3.0 could not queue the message"}))
                continue
            decided = self._recipient(req, i, item, token)
            if isinstance(decided, str):
                failed.append((i, {"email": _email_of(item), "reason": decided}))
                continue
            address, decision, item = decided
            if address.lower() in seen:
                failed.append((i, {"email": address, "reason": "duplicate recipient in this request"}))
                continue
            seen.add(address.lower())
            name = (item.get("name") if isinstance(item, dict) else "") or ""
            if named and (not isinstance(name, str) or len(name) > 200 or "\n" in name or "\r" in name):
                failed.append((i, {"email": address, "reason": "name must be one line of at most 200 characters"}))
                continue
            own = (item.get("substitutions") if isinstance(item, dict) else None) or {}
            metadata = item.get("metadata") if isinstance(item, dict) else None
            chunk.append((i, self._envelope(req, address, decision, token, metadata), name, {**req.substitutions, **own}))
            if len(chunk) >= count:
                break
        return chunk

    def _prepare(self, builder: MessageBuilder | None, raw: bytes | None, envelope: Envelope, name: str,
                 variables: dict[str, Any], track: dict[str, bool] | None) -> tuple[bytes, bool]:  # fmt: skip
        """On the rendering thread: one recipient's message, and whether tracking was given up."""
        data = builder.build(envelope.recipients[0].address, name, variables) if builder is not None else cast(bytes, raw)
        if self.tracker is None:
            return data, False
        try:
            return self.tracker(data, envelope, track), False
        except RenderTimeout:
            return data, True

    @defer.inlineCallbacks
    def _run(self, req: InjectRequest, builder: MessageBuilder | None, raw: bytes | None, token: str) -> Any:
        failed: list[tuple[int, dict[str, str]]] = []  # (position, why): sorted at the end
        queued: list[tuple[int, str]] = []  # (position in the request, qid): enqueues finish out of order
        in_flight: list[defer.Deferred[Any]] = []  # groups of messages being written
        group: list[tuple[int, Envelope, bytes]] = []  # built messages not handed to the queue yet
        group_bytes = 0
        seen: set[str] = set()
        broken: list[str] = []  # why the queue refused a write: the rest is not tried, for a retry
        items = iter(enumerate(req.recipients))
        pending: list[tuple[int, Envelope, str, dict[str, Any]]] = []
        while True:
            # Built a chunk at a time (one hop to the rendering thread), at most CHUNK_BYTES of
            # messages held at once; each is queued as soon as it is built.
            pending += self._admit(req, items, token, failed, seen, broken, CHUNK - len(pending), builder is not None)
            if not pending:
                break
            jobs = [(builder, raw, envelope, name, variables, req.track) for _, envelope, name, variables in pending]
            prepared = yield self.renderer.run_each(self._prepare, jobs, CHUNK_BYTES)
            done, pending = pending[: len(prepared)], pending[len(prepared) :]
            for (i, envelope, _, _), outcome in zip(done, prepared, strict=True):
                address = envelope.recipients[0].address
                if isinstance(outcome, TemplateError | RenderTimeout):
                    if isinstance(outcome, RenderTimeout) and builder is None:  # only tracking ran: sent untracked
                        outcome = (cast(bytes, raw), True)
                    else:
                        reason = str(outcome) if isinstance(outcome, TemplateError) else "template ran too long"
                        failed.append((i, {"email": address, "reason": f"template error: {reason}"}))
                        continue
                if isinstance(outcome, BaseException):
                    raise outcome
                data, untracked = outcome
                if untracked:
                    log.warn("tracking rewrite for {qid} ran too long: sent untracked", qid=envelope.qid)
                if len(data) > self.max_message_size:
                    failed.append((i, {"email": address, "reason": "5.3.4 message too big"}))
                    continue
                if self.closing:
                    failed.append((i, {"email": address, "reason": "4.3.2 the MTA is shutting down"}))
                    continue
                if broken:
                    failed.append((i, {"email": address, "reason": "4.3.0 could not queue the message"}))
                    continue
                if self.sign is not None:
                    data = yield self.sign(data, f"api:{token}", "api")
                data = self._received(envelope, token) + data
                envelope.size = len(data)
                group.append((i, envelope, data))
                group_bytes += len(data)
                del data
                if len(group) >= GROUP or group_bytes >= GROUP_BYTES:
                    in_flight.append(self._enqueue_group(group, queued, failed, broken))
                    group, group_bytes = [], 0
                    if len(in_flight) >= GROUPS_IN_FLIGHT:
                        yield in_flight.pop(0)
            if group and not pending:  # what this chunk built goes out before the next is built
                in_flight.append(self._enqueue_group(group, queued, failed, broken))
                group, group_bytes = [], 0
        if group:
            in_flight.append(self._enqueue_group(group, queued, failed, broken))
        yield defer.gatherResults(in_flight)
        queue_ids = [qid for _, qid in sorted(queued)]  # in the order of the request's recipients
        failures = [why for _, why in sorted(failed, key=lambda f: f[0])]
        log.info("injected {ok} message(s), {bad} recipient(s) failed, by token {token}", ok=len(queue_ids),
                 bad=len(failures), token=token, campaign=req.campaign, tenant=req.tenant)  # fmt: skip
        result = {"success_count": len(queue_ids), "fail_count": len(failures), "failed_recipients": failures,
                  "queue_ids": queue_ids}  # fmt: skip
        if broken and not queue_ids:  # nothing queued because the queue cannot be written: retry later
            return 503, {"error": f"the queue cannot be written: {broken[0]}", **result}
        return result

    def _received(self, envelope: Envelope, token: str) -> bytes:
        # Wall-clock time on purpose: a trace header states when the message arrived.
        stamp = header_date(self.clock.seconds(), localtime=True)
        return (f"Received: from api (token {token})\r\n\tby {self.hostname} (pymta) with HTTP id {envelope.qid}"
                f"\r\n\tfor <{envelope.recipients[0].address}>; {stamp}\r\n").encode()  # fmt: skip

    def _envelope(self, req: InjectRequest, address: str, decision: Any, token: str,
                  metadata: dict[str, Any] | None) -> Envelope:  # fmt: skip
        extra: dict[str, Any] = {}
        if req.pool:
            extra["pool"] = req.pool
        for key, value in (("campaign", req.campaign), ("tenant", req.tenant), ("metadata", metadata)):
            if value:
                extra[key] = value
        now = self.clock.seconds()
        return Envelope(
            qid=new_qid(now),
            sender=req.sender,
            recipients=self.policy.queue_recipients(decision.targets, decision.original, None, None, req.sender, now)
            if decision.targets  # an alias or virtual address: its expansion, as over SMTP
            else [Recipient(address=address, route=decision.route)],
            arrival=now,
            body_type="8BITMIME",
            smtputf8=not (req.sender.isascii() and address.isascii()),
            client_address="",
            helo="",
            protocol="HTTP",
            auth_user=f"api:{token}",
            not_before=req.not_before,
            extra=extra,
        )

    def _enqueue_group(self, group: list[tuple[int, Envelope, bytes]], queued: list[tuple[int, str]],
                       failed: list[tuple[int, dict[str, str]]], broken: list[str]) -> defer.Deferred[Any]:  # fmt: skip
        """Hand ``group`` to the queue in one call; fires once each is queued (and its records on disk) or failed."""
        for _, envelope, _ in group:
            leave_records_to_pickup(envelope, self.accounting, self.records_at_pickup)
        d = defer.maybeDeferred(self.store.enqueue_many, [(envelope, data) for _, envelope, data in group])

        def each(results: list[Any]) -> defer.Deferred[Any]:
            records = []
            for (i, envelope, _), result in zip(group, results, strict=True):
                if isinstance(result, BaseException):
                    self._not_queued(Failure(result), envelope, failed, broken, i)
                else:
                    records.append(self._queued(result, envelope, queued, i))
            return defer.gatherResults(records)

        def all_failed(failure: Failure) -> None:
            for i, envelope, _ in group:
                self._not_queued(failure, envelope, failed, broken, i)

        return d.addCallbacks(each, all_failed)

    def _queued(self, _: Any, envelope: Envelope, queued: list[tuple[int, str]], position: int) -> defer.Deferred[Any]:
        queued.append((position, envelope.qid))
        return record_queued(envelope, self.accounting, self.on_queued, listener="http")  # answered once on disk

    def _not_queued(self, failure: Any, envelope: Envelope, failed: list[tuple[int, dict[str, str]]], broken: list[str],
                    position: int) -> None:  # fmt: skip
        log.error("could not queue an injected message for {rcpt}: {why}", rcpt=envelope.recipients[0].address,
                  why=failure.getErrorMessage())  # fmt: skip
        if failure.check(QueueError, QueueFull):  # the store itself failed (read-only, full, I/O error)
            broken.append(failure.getErrorMessage()[:200])
        failed.append((position, {"email": envelope.recipients[0].address, "reason": "4.3.0 could not queue the message"}))
