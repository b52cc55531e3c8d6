#!/usr/bin/env python3
"""What reusing a finished queue file's inode would save (issue 9, point 2): the kernel CPU and
wall time of the store's durable write path per message, done two ways on the disk under --dir:

* create: a new file in tmp/ (O_CREAT|O_EXCL), write, fsync, rename into q/; the message queued
  20 before it is unlinked (a relay's steady state: files are created after many deletions);
* reuse: a retired file is claimed by a rename from free/ into tmp/, rewritten in place (pwrite,
  ftruncate), fsynced and renamed into q/; the message queued 20 before it is renamed into free/.

Usage: python bench/inode_reuse.py [--dir /var/tmp/pymta-inode] [--messages 10000] [--rounds 2]

Prints wall, user and system microseconds per message for each way, alternated over --rounds.
Not a test and not pymta's code: the two write paths alone, in one thread. The store writes over
spare files (``[queue] spare_files``); measured end to end, where the unlinks and creates of
two processes meet on one file system, the saving is larger than here: compare
``PYMTA_SPARE_FILES=0 bench/relay.sh`` with ``bench/relay.sh``.
Bounded by --messages x --rounds; the directory is emptied after each round.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time


def run(root: str, mode: str, count: int) -> tuple[float, float, float]:
    for sub in ("tmp", "q", "free"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    data = os.urandom(2300)
    free: list[str] = []
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(count):
        name = f"m{i:08d}"
        tmp = os.path.join(root, "tmp", name)
        if mode == "reuse" and free:
            os.rename(free.pop(), tmp)
            fd = os.open(tmp, os.O_WRONLY)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(root, "q", name))
        if i >= 20:
            old = os.path.join(root, "q", f"m{i - 20:08d}")
            if mode == "reuse":
                retired = os.path.join(root, "free", f"m{i - 20:08d}")
                os.rename(old, retired)
                free.append(retired)
            else:
                os.unlink(old)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    return (wall / count * 1e6, (after.ru_utime - before.ru_utime) / count * 1e6,
            (after.ru_stime - before.ru_stime) / count * 1e6)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/var/tmp/pymta-inode")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    try:
        for _ in range(args.rounds):
            for mode in ("create", "reuse"):
                wall, user, system = run(os.path.join(args.dir, mode), mode, args.messages)
                print(f"{mode}: {wall:.0f} us wall, {user:.0f} us user, {system:.0f} us system per message", flush=True)
                shutil.rmtree(os.path.join(args.dir, mode))
    finally:
        shutil.rmtree(args.dir, True)


if __name__ == "__main__":
    main()
