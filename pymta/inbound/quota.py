"""Mailbox quotas on Maildirs, kept the Maildir++ way (``maildirsize``) so Dovecot and Courier agree.

``maildirsize`` in the Maildir's top directory: the first line is the quota (``1073741824S``),
each further line ``octets count`` a change (deliveries add, IMAP servers that expunge subtract).
It is recalculated from the files (their ``,S=`` size, else ``stat``) when missing, when it grew
past 5120 octets, when the quota changed, or when it says "over quota" and is older than 15
minutes (a client may have deleted mail without saying so).
"""

from __future__ import annotations

import os
import re

RECALC_OCTETS = 5120
STALE_OVER_QUOTA = 15 * 60.0
MAX_READ = 64 * 1024
_SIZE_IN_NAME = re.compile(r",S=(\d+)")


class Quotas:
    """The quota of each mailbox: ``overrides`` by address, then by ``@domain``, else ``default`` (0: none)."""

    def __init__(self, default: int = 0, overrides: dict[str, int] | None = None) -> None:
        self.default = default
        self.overrides = {k.lower(): v for k, v in (overrides or {}).items()}

    def __bool__(self) -> bool:
        return bool(self.default) or any(self.overrides.values())

    def limit_for(self, address: str) -> int:
        address = address.lower()
        for key in (address, "@" + address.rpartition("@")[2]):
            if key in self.overrides:
                return self.overrides[key]
        return self.default


def _read(path: str) -> tuple[str, int, int, int] | None:
    """(quota line, octets, messages, file size) from ``maildirsize``, or None when absent/unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_READ + 1)
    except OSError:
        return None
    if len(raw) > MAX_READ:
        return None
    lines = raw.decode("ascii", "replace").splitlines()
    if not lines:
        return None
    octets = count = 0
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            octets += int(parts[0])
            count += int(parts[1])
        except ValueError:
            continue
    return lines[0].strip(), octets, count, len(raw)


def quota_line(limit: int) -> str:
    return f"{limit}S"


def known_usage(maildir: str, limit: int) -> int | None:
    """The usage ``maildirsize`` states, when it is there and made for this quota (no scanning)."""
    got = _read(os.path.join(maildir, "maildirsize"))
    if got is None or got[0] != quota_line(limit):
        return None
    return max(0, got[1])


def usage(maildir: str, limit: int, now: float, incoming: int = 0) -> int:
    """Octets in the Maildir (every folder), recalculating ``maildirsize`` when the rules say so
    (a count that leaves no room for ``incoming`` octets is trusted for 15 minutes only)."""
    path = os.path.join(maildir, "maildirsize")
    got = _read(path)
    if got is not None and got[0] == quota_line(limit) and got[3] < RECALC_OCTETS:
        octets = max(0, got[1])
        if octets + incoming <= limit:
            return octets
        try:
            if now - os.stat(path).st_mtime < STALE_OVER_QUOTA:
                return octets
        except OSError:
            pass
    return recalculate(maildir, limit)


def _folders(maildir: str) -> list[str]:
    out = [maildir]
    try:
        with os.scandir(maildir) as entries:
            out.extend(e.path for e in entries if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir())
    except OSError:
        pass
    return out


def recalculate(maildir: str, limit: int) -> int:
    """Count every message in every folder and write a fresh ``maildirsize`` (tmp + rename)."""
    octets = count = 0
    for folder in _folders(maildir):
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(folder, sub)) as entries:
                    for entry in entries:
                        m = _SIZE_IN_NAME.search(entry.name)
                        try:
                            octets += int(m.group(1)) if m else entry.stat().st_size
                        except OSError:
                            continue
                        count += 1
            except OSError:
                continue
    if os.path.isdir(maildir):
        tmp = os.path.join(maildir, "tmp", f"maildirsize.{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(f"{quota_line(limit)}\n{octets:12d} {count:12d}\n")
            os.replace(tmp, os.path.join(maildir, "maildirsize"))
        except OSError:
            pass
    return octets


def add(maildir: str, limit: int, octets: int) -> None:
    """Record one delivered message (a single appended line, as Maildir++ writers do)."""
    path = os.path.join(maildir, "maildirsize")
    if not os.path.exists(path):
        recalculate(maildir, limit)  # counts the message just delivered
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    try:
        os.write(fd, f"{octets} 1\n".encode())
    finally:
        os.close(fd)
