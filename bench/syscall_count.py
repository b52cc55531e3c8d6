#!/usr/bin/env python3
"""Per-message kernel operations from ``strace -f -C`` output files (bench/syscalls.sh).

  syscall_count.py N NAME=TRACE [NAME=TRACE ...]
For each peer: all system calls, file creates (open/openat/creat with O_CREAT), fsync + fdatasync,
and renames, each divided by N (the messages relayed while strace was attached), as a markdown table,
then what was fsynced (strace -y names the file of each descriptor; queue ids and hash directories
are folded). A trace line is one system call (``-f`` prefixes the pid; ``<unfinished ...>`` halves
are counted once).
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(?:\d+:\d+:\d+(?:\.\d+)?\s+)?([a-z_0-9]+)\(")
_RESUMED = re.compile(r"<\.\.\. [a-z_0-9]+ resumed>")
_SYNCED = re.compile(r"^[a-z]+\(\d+<([^>]*)>")
_VARYING = re.compile(r"/(?=[0-9A-Za-z]*\d)[0-9A-Za-z]{8,}(?=/|$)|/[0-9A-Za-z](?=/|$)")


def synced_name(line: str) -> str:
    """What an fsync line synced (from strace -y), with queue ids and hash directories folded."""
    m = _SYNCED.match(line.split(None, 1)[1] if line[:1].isdigit() else line)
    return _VARYING.sub("/*", m.group(1)) if m else "?"


def count(path: str) -> Counter[str]:
    """Calls by kind in one trace: ``calls``, ``creates``, ``fsyncs``, ``renames``, and by name."""
    counts: Counter[str] = Counter()
    with open(path, errors="replace") as f:
        for line in f:
            if _RESUMED.search(line):
                continue  # the second half of a call already counted at its start
            m = _CALL.match(line)
            if m is None:
                continue
            name = m.group(1)
            counts["calls"] += 1
            counts[name] += 1
            if name in ("open", "openat", "openat2", "creat") and (name == "creat" or "O_CREAT" in line):
                counts["creates"] += 1
            elif name in ("fsync", "fdatasync"):
                counts["fsyncs"] += 1
                counts["fsync " + synced_name(line)] += 1
            elif name in ("rename", "renameat", "renameat2"):
                counts["renames"] += 1
    return counts


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[1].isdigit() or not all("=" in a for a in argv[2:]):
        sys.stderr.write(__doc__ or "")
        return 2
    n = int(argv[1])
    rows = [(name, count(path)) for name, path in (a.split("=", 1) for a in argv[2:])]
    print(f"per message ({n} messages of each peer traced)\n")
    print("| peer | syscalls | creates | fsync+fdatasync | renames | top calls |")
    print("|---|---|---|---|---|---|")
    kinds = ("calls", "creates", "fsyncs", "renames")
    for name, c in rows:
        top = ", ".join(f"{k} {v / n:.1f}" for k, v in c.most_common(16) if k not in kinds and " " not in k)
        print(f"| {name} | " + " | ".join(f"{c[k] / n:.2f}" for k in kinds) + f" | {top} |")
    print("\n| peer | fsyncs per message by what was synced |\n|---|---|")
    for name, c in rows:
        synced = sorted(((v, k[6:]) for k, v in c.items() if k.startswith("fsync ")), reverse=True)
        print(f"| {name} | " + ", ".join(f"{what} {v / n:.2f}" for v, what in synced[:8]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
