"""The pymta configuration the benchmarks run, in one place: the Python benchmarks import
:func:`bench_config`; bench/pymta_config.sh prints it for the shell ones
(``python3 bench/pymta_config.py STATE_DIR PORT SINK_PORT relay|accept``).

relay: delivers everything to the smtp-sink on ``sink_port``; accept: only accepts into the queue
(no delivery, no accounting log). fsync on unless asked otherwise; ``processes`` defaults to
$PYMTA_PROCESSES, else 2 (one per core here); $PYMTA_SPARE_FILES, when set, is ``[queue]
spare_files`` (0: every finished queue file unlinked, a new file created per message)."""

from __future__ import annotations

import os
import sys


def bench_config(state_dir: str, port: int, sink_port: int, mode: str = "relay", *, processes: int | None = None,
                 fsync: bool = True, accounting: bool | None = None, max_message_size: int = 64 * 1024 * 1024,
                 smtp: str = "", tail: str = "") -> str:  # fmt: skip
    """The TOML text. ``accounting``: the accounting log (default: on to relay, off to accept);
    ``smtp``: more [smtp] keys; ``tail``: more sections at the end."""
    if mode not in ("relay", "accept"):
        raise ValueError(f"mode must be relay or accept, not {mode!r}")
    if processes is None:
        processes = int(os.environ.get("PYMTA_PROCESSES") or 2)
    accept = mode == "accept"
    if accounting is None:
        accounting = not accept
    lines = [
        'hostname = "mx.bench.example"',
        f'state_dir = "{state_dir}"',
        "[smtp]",
        f'listen = ["tcp:{port}:interface=127.0.0.1"]',
        f"processes = {processes}",
        f"max_message_size = {max_message_size}",
        *([smtp.strip()] if smtp.strip() else []),
        "[domains]",
        'local = ["bench.example"]',
        'relay_from = ["127.0.0.0/8"]',
        "[queue]",
        *(["deliver = false"] if accept else []),
        f"fsync = {'true' if fsync else 'false'}",
        *([f"spare_files = {int(os.environ['PYMTA_SPARE_FILES'])}"] if os.environ.get("PYMTA_SPARE_FILES") else []),
        "[outbound]",
        f'smarthost = "127.0.0.1:{sink_port}"',
        "max_connections = 100",
        "max_connections_per_domain = 50",
        *([] if accounting else ["[log]", "accounting = false"]),
        *([tail.strip()] if tail.strip() else []),
    ]
    return "\n".join(lines) + "\n"


def write_bench_config(path: str, *args: object, **kw: object) -> str:
    """:func:`bench_config` written to ``path``; returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(bench_config(*args, **kw))  # type: ignore[arg-type]
    return path


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: pymta_config.py STATE_DIR PORT SINK_PORT relay|accept")
    state, port, sink, mode = sys.argv[1:]
    sys.stdout.write(bench_config(state, int(port), int(sink), mode))
