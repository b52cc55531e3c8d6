#!/usr/bin/env python3
"""Memory of the MTA under many sessions and a large message (issue 9, point 6).

Usage: python bench/session_memory.py [--sessions 1000] [--message-mib 30] [--dir DIR]

Starts ``twistd -n pymta`` (one process, fsync on, relaying to ``smtp-sink``) and reports its RSS:
at rest; with ``--sessions`` sessions open at once (each greeted and past EHLO); then while one
more session sends a ``--message-mib`` MiB message (peak RSS, ``VmHWM``), and after it is
queued (250). Prints one JSON line; the bound stated in README.md comes from it. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.pymta_config import write_bench_config
from bench.queue_scale import free_port, greet, rss_mib, start_mta, stop_mta


def read_reply(s: socket.socket, deadline: float) -> bytes:
    data = b""
    while time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        last = data.rstrip(b"\r\n").rpartition(b"\r\n")[2]
        if data.endswith(b"\r\n") and last[3:4] == b" ":
            return data
    raise RuntimeError(f"no complete reply: {data[-200:]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--message-mib", type=int, default=30)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="pymta-memory-", dir=args.dir)
    port, sink_port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *user, "-c", f"127.0.0.1:{sink_port}", "1000"], stdout=subprocess.DEVNULL)
    config = write_bench_config(os.path.join(work, "pymta.toml"), work, port, sink_port, processes=1,
                                max_message_size=(args.message_mib + 2) * 1024 * 1024,
                                smtp=f"max_connections = {args.sessions + 10}")
    proc, err = start_mta(work, config, os.path.join(work, "log.jsonl"))
    out: dict = {"sessions": args.sessions, "message_mib": args.message_mib}
    socks: list[socket.socket] = []
    try:
        if not greet(port, 180):
            raise RuntimeError("no greeting")
        time.sleep(1)
        out["rest_mib"] = round(rss_mib(proc.pid)[0])
        deadline = time.monotonic() + 600
        for _ in range(args.sessions):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            socks.append(s)
            read_reply(s, deadline)
            s.sendall(b"EHLO client.example\r\n")
            read_reply(s, deadline)
        out["sessions_mib"] = round(rss_mib(proc.pid)[0])
        line = b"x" * 998 + b"\r\n"
        body = b"Subject: large\r\n\r\n" + line * (args.message_mib * 1024 * 1024 // len(line))
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            read_reply(s, deadline)
            s.sendall(b"EHLO client.example\r\nMAIL FROM:<a@bench.example>\r\nRCPT TO:<b@sink.example>\r\nDATA\r\n")
            while b"354 " not in read_reply(s, deadline):
                pass
            t0 = time.monotonic()
            s.sendall(body + b".\r\n")
            reply = read_reply(s, deadline)
            out["data_s"] = round(time.monotonic() - t0, 2)
            out["reply"] = reply.decode(errors="replace").strip()[:60]
        out["after_mib"], out["peak_mib"] = (round(v) for v in rss_mib(proc.pid))
        out["per_session_kib"] = round((out["sessions_mib"] - out["rest_mib"]) * 1024 / args.sessions, 1)
    finally:
        for s in socks:
            s.close()
        stop_mta(proc, err)
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
        shutil.rmtree(work, True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
