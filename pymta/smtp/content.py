"""Message content on the wire: the server's DATA/BDAT scanning and un-stuffing, the client's
dot-stuffing, side by side.

Content is handled as bytes, a chunk at a time: end-of-data is found with ``bytes.find``, the
content rules (CRLF line ends only, no NUL, lines of at most 1000 octets) are checked with C-level
counts, and (un)stuffing is one ``bytes.replace`` over the whole message.
"""

from __future__ import annotations

from pymta.smtp.replies import Reply

MAX_LINE = 1000  # octets before LF that make a line longer than 1000 octets with its CRLF
END_OF_DATA = b"\r\n.\r\n"


_NOT_CR_LF = bytes(b for b in range(256) if b not in (0x0D, 0x0A))


def only_crlf(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether every CR and every LF in ``data[start:end]`` belongs to a CRLF: the CRs and LFs
    there (one C-level ``translate``) are exactly two per CRLF found (one C-level count), as CRLFs
    cannot overlap. No per-byte Python; a third of the time of counting CR, LF and CRLF apart."""
    end = len(data) if end is None else end
    part = data if start == 0 and end == len(data) else data[start:end]
    return len(part.translate(None, _NOT_CR_LF)) == 2 * part.count(b"\r\n")


def has_long_line(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` (whole lines: ``end`` is an LF or the end) holds a line of
    MAX_LINE octets or more before its LF. Each step looks for the last LF in the next MAX_LINE
    octets (a C-level ``rfind``) and two steps advance at least MAX_LINE octets, so a chunk costs
    about 2 * len / MAX_LINE calls, not one per line."""
    pos = start
    while end - pos >= MAX_LINE:
        lf = data.rfind(b"\n", pos, pos + MAX_LINE)
        if lf < 0:
            return True  # MAX_LINE octets with no LF in them
        pos = lf + 1
    return False


class BodyCollector:
    """Collects message content chunk by chunk and notes what makes it unacceptable."""

    __slots__ = ("bare_eol", "limit", "line_len", "long_line", "nul", "parts", "pending_cr", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.bare_eol = self.nul = self.long_line = False
        self.line_len = 0  # octets since the last LF
        self.pending_cr = False  # the previous chunk ended with CR

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.size <= self.limit:
            self.parts.append(chunk)
        elif self.parts:
            self.parts = []  # over the limit: stop holding it, keep scanning
        if not self.bare_eol:
            start = 0
            if self.pending_cr:
                if chunk[:1] == b"\n":
                    start = 1  # the CR that ended the previous chunk and this LF make a CRLF
                else:
                    self.bare_eol = True
            end = len(chunk) - 1 if chunk[-1:] == b"\r" else len(chunk)  # a final CR waits for the next chunk
            if not only_crlf(chunk, start, end):
                self.bare_eol = True
        self.pending_cr = chunk[-1:] == b"\r"
        if not self.nul and b"\0" in chunk:
            self.nul = True
        if not self.long_line:
            first_lf = chunk.find(b"\n")
            if first_lf < 0:
                self.line_len += len(chunk)
                self.long_line = self.line_len >= MAX_LINE
                return
            last_lf = chunk.rfind(b"\n")
            if self.line_len + first_lf >= MAX_LINE or has_long_line(chunk, first_lf + 1, last_lf):
                self.long_line = True
            self.line_len = len(chunk) - last_lf - 1
            if self.line_len >= MAX_LINE:
                self.long_line = True

    def problem(self, final_cr_ok: bool = False) -> Reply | None:
        if self.size > self.limit:
            return Reply(552, "5.3.4", f"Message size exceeds fixed maximum message size ({self.limit} octets)")
        if self.bare_eol or (self.pending_cr and not final_cr_ok):
            return Reply(550, "5.6.0", "Message contains bare CR or bare LF; lines must end with CRLF")
        if self.nul:
            return Reply(550, "5.6.0", "Message contains NUL characters")
        if self.long_line:
            return Reply(550, "5.6.0", "Message contains lines longer than 1000 octets")
        return None

    def body(self, trim: int = 0) -> bytes:
        data = b"".join(self.parts)
        return data[: len(data) - trim] if trim else data


class DataScanner:
    """DATA content up to ``CRLF.CRLF``, fed chunk by chunk into a :class:`BodyCollector`.

    The end may straddle chunks: the last four octets seen are kept and searched again with the
    next chunk (the CRLF before the dot belongs to the message)."""

    __slots__ = ("body", "carry")

    def __init__(self, body: BodyCollector) -> None:
        self.body = body
        self.carry = b"\r\n"  # DATA starts a line: a first line of "." ends an empty message

    def feed(self, chunk: bytes) -> tuple[int, bytes] | None:
        """Take ``chunk``: None while the end is not reached (all of it is content), else
        ``(trim, rest)``: octets the body already holds beyond its end, and the input after it."""
        carry = self.carry
        window = carry + chunk
        end = window.find(END_OF_DATA)
        if end < 0:
            self.body.feed(chunk)
            self.carry = window[-4:]
            return None
        cut = end + 2 - len(carry)  # where the body ends inside chunk (negative: in the carry)
        if cut > 0:
            self.body.feed(chunk[:cut])
        return (-cut if cut < 0 else 0), window[end + 5 :]


def unstuff(data: bytes) -> bytes:
    """Received DATA content -> the message: a leading dot removed from every line that has one."""
    if b"\n." in data or data[:1] == b".":
        return (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]
    return data


def encode_data(body: bytes) -> bytes:
    """The DATA payload: CRLF line ends everywhere, dot-stuffed, terminated by ``CRLF.CRLF``."""
    data = body if only_crlf(body) else body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"
