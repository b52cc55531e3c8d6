"""The queue file format: one self-validating file per message, body and envelope records together.

Layout (integers little-endian)::

    header   8s magic "PYMTAQ1\\n", Q body length, I crc32 of the body, I crc32 of the 20 bytes before it
    body     the message exactly as accepted (written once, never rewritten)
    records  one or more envelope records, appended: 4s "ENV1", I payload length, I crc32 of the
             payload, then the payload (the envelope's JSON, :meth:`pymta.envelope.Envelope.to_json`)

The file is written whole at accept time with the first record. Every later change of the
envelope (per-recipient results, attempt counts, next-attempt time) appends a record in place
and fsyncs the file: no new file, no rename. The last record whose length and checksum hold is
the envelope; a torn record at the end (a crash during its write) is ignored, so the state
before it counts and its recipients are tried again. A body shorter than recorded, or whose
checksum differs, makes the whole file unusable (quarantined by the store).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"PYMTAQ1\n"
HEADER = struct.Struct("<8sQII")
RECORD = struct.Struct("<4sII")
RECORD_MAGIC = b"ENV1"
MAX_RECORD = 16 * 1024 * 1024  # an envelope larger than this is refused (and a length above it is garbage)
COMPACT_AFTER = 64 * 1024  # records beyond this many bytes are folded into a rewritten file


class QueueFileError(ValueError):
    """The queue file is not usable: torn, truncated or not a queue file. The text says why."""


def header(body: bytes | memoryview) -> bytes:
    head = struct.pack("<8sQI", MAGIC, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head))


def record(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD:
        raise ValueError(f"envelope of {len(payload)} bytes is over the {MAX_RECORD} byte limit")
    return RECORD.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def parse_header(raw: bytes | memoryview) -> tuple[int, int]:
    """``(body_length, body_crc)`` from the first HEADER.size bytes of a queue file."""
    if len(raw) < HEADER.size:
        raise QueueFileError("file shorter than its header")
    magic, body_len, body_crc, head_crc = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise QueueFileError("not a queue file (bad magic)")
    if zlib.crc32(raw[: HEADER.size - 4]) != head_crc:
        raise QueueFileError("header checksum mismatch")
    return body_len, body_crc


@dataclass(slots=True)
class Records:
    """What a scan of the record area found."""

    last: bytes | None  # payload of the last sound record, None if there is none
    count: int  # sound records
    end: int  # offset (from the start of the record area) just past the last sound record
    torn: bool  # bytes follow the last sound record (a torn append)


def scan_records(area: bytes | memoryview) -> Records:
    """Walk the record area; stop at the first record whose framing or checksum does not hold."""
    view = memoryview(area)
    pos, last, count = 0, None, 0
    while len(view) - pos >= RECORD.size:
        magic, length, crc = RECORD.unpack_from(view, pos)
        start = pos + RECORD.size
        if magic != RECORD_MAGIC or length > MAX_RECORD or start + length > len(view):
            break
        payload = view[start : start + length]
        if zlib.crc32(payload) != crc:
            break
        last, count, pos = bytes(payload), count + 1, start + length
    return Records(last, count, pos, pos < len(view))


@dataclass(slots=True)
class QueueFile:
    """A queue file opened for reading: where things are and the envelope payload."""

    body_len: int
    body_crc: int
    size: int  # file size when read
    records: Records

    @property
    def records_start(self) -> int:
        return HEADER.size + self.body_len


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    chunks, want = [], length
    while want:
        chunk = os.pread(fd, want, offset)
        if not chunk:
            break
        chunks.append(chunk)
        want -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


SMALL_FILE = 128 * 1024  # a file up to this size is read with one pread (its pages are read anyway)


def read_meta(fd: int, verify_body: bool = False) -> QueueFile:
    """Header and envelope records of the open queue file ``fd``; the body is checked against its
    checksum only with ``verify_body`` (and then only when the whole file is small)."""
    size = os.fstat(fd).st_size
    if size <= SMALL_FILE:
        return _parse_whole(_pread_exact(fd, size, 0), verify_body)[0]
    raw = memoryview(_pread_exact(fd, HEADER.size, 0))
    body_len, body_crc = parse_header(raw[: HEADER.size])
    start = HEADER.size + body_len
    if size < start:
        raise QueueFileError(f"torn body: {size - HEADER.size} of {body_len} bytes")
    return QueueFile(body_len, body_crc, size, scan_records(_pread_exact(fd, size - start, start)))


def read_message(fd: int) -> tuple[QueueFile, bytes]:
    """Header, envelope records and the body (checked against its checksum) of the open queue
    file ``fd``: what an attempt needs, with one open. A small file is read whole in one pread;
    a larger one in parts, so its body is not held twice (the whole file, then a slice of it)."""
    size = os.fstat(fd).st_size
    if size <= SMALL_FILE:
        return _parse_whole(_pread_exact(fd, size, 0), verify_body=True)
    return read_meta(fd), read_body(fd)


def _parse_whole(data: bytes, verify_body: bool) -> tuple[QueueFile, bytes]:
    """A whole queue file's bytes -> (its header and records, its body)."""
    raw = memoryview(data)
    body_len, body_crc = parse_header(raw[: HEADER.size])
    start = HEADER.size + body_len
    if len(raw) < start:
        raise QueueFileError(f"torn body: {len(raw) - HEADER.size} of {body_len} bytes")
    body = raw[HEADER.size : start]
    if verify_body and zlib.crc32(body) != body_crc:
        raise QueueFileError("body checksum mismatch")
    return QueueFile(body_len, body_crc, len(raw), scan_records(raw[start:])), data[HEADER.size : start]


def read_body(fd: int) -> bytes:
    """The body of the open queue file ``fd``, checked against its recorded length and checksum."""
    body_len, body_crc = parse_header(_pread_exact(fd, HEADER.size, 0))
    body = _pread_exact(fd, body_len, HEADER.size)
    if len(body) != body_len:
        raise QueueFileError(f"torn body: {len(body)} of {body_len} bytes")
    if zlib.crc32(body) != body_crc:
        raise QueueFileError("body checksum mismatch")
    return body


def is_queue_file(first_bytes: bytes) -> bool:
    return first_bytes.startswith(MAGIC)
