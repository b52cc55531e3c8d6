"""SMTP reply values: code, RFC 3463 enhanced status code, text; formatting and parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``code`` (e.g. 250), ``enhanced`` (e.g. "2.0.0", or "" for none), text lines."""

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def to_bytes(self) -> bytes:
        """Wire form: every line carries the code and the enhanced code; CRLF terminated."""
        out = []
        lines = self.lines()
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            if self.enhanced:
                out.append(f"{self.code}{sep}{self.enhanced} {line}".rstrip(" "))
            else:
                out.append(f"{self.code}{sep}{line}".rstrip(" "))
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced}".strip()
        return f"{head} {self.text}".strip()

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Reply:
        return cls(int(cast("int | str", data["code"])), str(data.get("enhanced") or ""), str(data.get("text") or ""))


def parse_reply_lines(lines: list[bytes]) -> Reply:
    """Build a :class:`Reply` from the raw lines of one (possibly multi-line) server reply.

    Each line is ``CODE[-| ]text`` without its CRLF. The enhanced code, when the first line
    carries one, is taken from it and stripped from every line's text.
    """
    if not lines:
        raise ValueError("empty reply")
    first = lines[0]
    if len(first) < 3 or not first[:3].isdigit():
        raise ValueError(f"malformed reply line: {first[:80]!r}")
    code = int(first[:3])
    enhanced = ""
    texts = []
    for raw in lines:
        text = raw[4:] if len(raw) > 3 else b""
        if not enhanced or text.startswith(enhanced.encode()):
            word, _, rest = text.partition(b" ")
            if _ENHANCED.match(word) and word[:1] == first[:1]:
                enhanced = enhanced or word.decode()
                text = rest
        texts.append(text.decode("utf-8", "replace"))
    return Reply(code, enhanced, "\n".join(texts))


def default_enhanced(code: int) -> str:
    """A generic enhanced status code for a basic code that came without one."""
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "")


# Replies used in more than one place.
OK = Reply(250, "2.0.0", "OK")
SERVICE_CLOSING = Reply(221, "2.0.0", "Bye")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
