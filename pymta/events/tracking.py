"""Open and click tracking: signed tokens and the rewrite of HTML parts.

Links (``<a href>``, ``<area href>``) to http(s) URLs in ``text/html`` parts become
``PUBLIC_URL/t/c/TOKEN``, where the token signs (qid, recipient, original URL) so the redirector
can never send anyone elsewhere; a 1x1 ``PUBLIC_URL/t/o/TOKEN.gif`` goes before the last
``</body>`` (at the end when there is none). Text parts, ``mailto:`` and other schemes, in-page
anchors, links in comments and every header (List-Unsubscribe included) are left alone;
relative links are resolved against ``<base href>`` when there is one (else left alone). An
HTML part that cannot be parsed cleanly, or decoded, is left unchanged. The rewrite runs
before DKIM signing, so signatures cover the rewritten body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import re
from email import message_from_bytes
from email.generator import BytesGenerator
from email.policy import compat32
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

MAX_URL = 2048
MAX_TOKEN = 4096
MAX_HTML = 10 * 1024 * 1024  # larger parts are left untracked
OPEN, CLICK = "o", "c"

# Fetchers that load images for the reader (privacy proxies) or scan links before anyone clicks.
_MACHINE_AGENTS = re.compile(
    r"GoogleImageProxy|ggpht\.com|YahooMailProxy|Mozilla/5\.0$|Barracuda|Mimecast|Proofpoint|"
    r"bot\b|crawler|spider|LinkPreview|Microsoft Office Existence|facebookexternalhit", re.I)  # fmt: skip


def is_machine(user_agent: str, headers: dict[str, str] | None = None) -> bool:
    """True for opens by known proxy fetchers: Apple Mail Privacy Protection (a bare
    ``Mozilla/5.0`` agent from Apple's relays), Gmail's and Yahoo's image proxies, link scanners."""
    ua = (user_agent or "").strip()
    return not ua or bool(_MACHINE_AGENTS.search(ua))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TrackingTokens:
    """``make(kind, qid, recipient, url)`` -> token; ``parse(kind, token)`` -> (qid, recipient, url) or None."""

    def __init__(self, secret: str) -> None:
        self.key = hashlib.sha256(b"pymta-tracking\x00" + secret.encode()).digest()

    def _mac(self, kind: str, payload: bytes) -> bytes:
        return hmac.new(self.key, kind.encode() + b"\x00" + payload, hashlib.sha256).digest()[:16]

    def make(self, kind: str, qid: str, recipient: str, url: str = "") -> str:
        payload = "\x00".join((qid, recipient, url)).encode("utf-8")
        return f"{_b64(payload)}.{_b64(self._mac(kind, payload))}"

    def parse(self, kind: str, token: str) -> tuple[str, str, str] | None:
        if len(token) > MAX_TOKEN or token.count(".") != 1:
            return None
        data, mac = token.split(".")
        try:
            payload, given = _unb64(data), _unb64(mac)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(self._mac(kind, payload), given):
            return None
        try:
            qid, recipient, url = payload.decode("utf-8").split("\x00")
        except (UnicodeDecodeError, ValueError):
            return None
        return qid, recipient, url


class _Links(HTMLParser):
    """Finds the href values to rewrite and where their start tags are."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.tags: list[tuple[tuple[int, int], str, str]] = []  # (line, col), raw tag text, href

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "base" and self.base is None:
            self.base = next((v for k, v in attrs if k == "href" and v), None)
        elif tag in ("a", "area"):
            href = next((v for k, v in attrs if k == "href"), None)
            if href is not None:
                self.tags.append((self.getpos(), self.get_starttag_text() or "", href))

    handle_startendtag = handle_starttag


_HREF = re.compile(r"""(\shref\s*=\s*)("[^"]*"|'[^']*'|[^\s"'>]+)""", re.I)


def _target(href: str, base: str | None) -> str | None:
    """The absolute http(s) URL a link goes to, or None when it is left alone."""
    href = href.strip()
    if not href or href.startswith("#") or len(href) > MAX_URL:
        return None
    scheme = urlsplit(href).scheme.lower()
    if not scheme:
        if not base:
            return None
        href = urljoin(base, href)
        scheme = urlsplit(href).scheme.lower()
    return href if scheme in ("http", "https") else None


def rewrite_html(text: str, click: Any, open_url: str | None) -> str | None:
    """The HTML with links through ``click(url) -> new_url`` and the open pixel; None when the
    HTML is not parsed cleanly (left unchanged by the caller)."""
    parser = _Links()
    try:
        parser.feed(text)
        if "<" in parser.rawdata:  # an unterminated tag or comment: malformed
            return None
        parser.close()
    except Exception:  # html.parser on hostile input: leave the part as it is
        return None
    starts = [0]  # where each line begins (html.parser counts lines by "\n" only)
    for text_line in text.split("\n"):
        starts.append(starts[-1] + len(text_line) + 1)
    edits: list[tuple[int, int, str]] = []
    if click is not None:
        for (line, col), raw, href in parser.tags:
            url = _target(href, parser.base)
            if url is None:
                continue
            begin = starts[line - 1] + col
            if text[begin : begin + len(raw)] != raw:
                return None
            quoted = html.escape(click(url), quote=True)

            def quote_href(m: re.Match[str], q: str = quoted) -> str:
                return f'{m.group(1)}"{q}"'

            new_raw, n = _HREF.subn(quote_href, raw, count=1)
            if n != 1:
                continue
            edits.append((begin, begin + len(raw), new_raw))
    out = text
    for begin, end, new in reversed(edits):
        out = out[:begin] + new + out[end:]
    if open_url is not None:
        pixel = (f'<img src="{html.escape(open_url, quote=True)}" width="1" height="1" alt="" '
                 'style="display:block;border:0;width:1px;height:1px" />')  # fmt: skip
        at = out.lower().rfind("</body")
        if at < 0:
            at = out.lower().rfind("</html")
        out = out[:at] + pixel + out[at:] if at >= 0 else out + pixel
    return out


def rewrite_message(data: bytes, tokens: TrackingTokens, public_url: str, qid: str, recipient: str,
                    opens: bool, clicks: bool) -> bytes:  # fmt: skip
    """``data`` (an RFC 5322 message) with its HTML parts rewritten; unchanged when nothing is."""
    if not (opens or clicks) or b"text/html" not in data[:MAX_HTML].lower():
        return data
    msg = message_from_bytes(data, policy=compat32)
    changed = False
    pixel_done = False
    for part in msg.walk():
        if part.get_content_type() != "text/html" or part.get_filename() or \
                (part.get("Content-Disposition", "").lower().startswith("attachment")):  # fmt: skip
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes) or len(raw) > MAX_HTML:
            continue
        charset = part.get_content_charset() or "us-ascii"
        try:
            text = raw.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue

        def click(url: str) -> str:
            return f"{public_url}/t/c/{tokens.make(CLICK, qid, recipient, url)}"

        open_url = f"{public_url}/t/o/{tokens.make(OPEN, qid, recipient)}.gif" if opens and not pixel_done else None
        new = rewrite_html(text, click if clicks else None, open_url)
        if new is None or new == text:
            continue
        pixel_done = pixel_done or open_url is not None
        cte = (part.get("Content-Transfer-Encoding") or "").lower()
        del part["Content-Transfer-Encoding"]
        encoded = new.encode(charset, "xmlcharrefreplace") if charset.lower() not in ("us-ascii", "ascii") \
            else new.encode("ascii", "xmlcharrefreplace")  # fmt: skip
        if cte == "base64":
            part.set_payload(base64.encodebytes(encoded).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
        elif (cte == "8bit" or (cte in ("7bit", "") and max(encoded, default=0) < 128)) and \
                all(len(line) <= 998 for line in encoded.split(b"\n")):  # fmt: skip
            part.set_payload(encoded.decode("ascii", "surrogateescape"))
            if cte:
                part["Content-Transfer-Encoding"] = cte
        else:
            import quopri

            part.set_payload(quopri.encodestring(encoded).decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        changed = True
    if not changed:
        return data
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=compat32.clone(linesep="\r\n")).flatten(msg)
    generated = out.getvalue()
    if not msg.is_multipart():  # its own headers name the new transfer encoding
        return generated if generated.endswith(b"\r\n") else generated + b"\r\n"
    # The top-level header section is kept byte for byte (folding, order, List-Unsubscribe...).
    head, sep, _ = data.partition(b"\r\n\r\n")
    _, sep2, body = generated.partition(b"\r\n\r\n")
    if not sep or not sep2:
        return data
    result = head + sep + body
    return result if result.endswith(b"\r\n") else result + b"\r\n"


class Tracker:
    """The rewrite for one injected message, as ``[tracking]`` and the request's ``track`` flags say:
    the flags win; without them, ``opens``/``clicks`` apply to the listed ``campaigns`` (all when
    none are listed)."""

    def __init__(self, config: Any, public_url: str, secret: str) -> None:
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.tokens = TrackingTokens(secret)

    def wanted(self, campaign: str | None, flags: dict[str, bool] | None) -> tuple[bool, bool]:
        c = self.config
        default = c.campaigns is None or (campaign is not None and campaign in c.campaigns)
        opens = c.opens and default
        clicks = c.clicks and default
        if flags:
            opens = flags.get("opens", opens)
            clicks = flags.get("clicks", clicks)
        return opens, clicks

    def __call__(self, data: bytes, envelope: Any, flags: dict[str, bool] | None = None) -> bytes:
        opens, clicks = self.wanted(envelope.extra.get("campaign"), flags)
        if not (opens or clicks):
            return data
        return rewrite_message(data, self.tokens, self.public_url, envelope.qid, envelope.recipients[0].address,
                               opens, clicks)  # fmt: skip
