"""``pymta-queue``: list, show, flush, delete, hold and release queued mail; shaping state.

Through the running MTA's control socket when it answers; with the MTA stopped, list, show,
delete, hold and release work on the queue directory directly (flush needs the running MTA).
``flush`` retries all deferred mail now and lifts every destination's pause (``postqueue -f``);
``flush ID`` that message, ``flush --domain D`` the mail for D; ``shaping [DOMAIN]`` explains.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from pymta.config import ConfigError, default_config_path, load_config

COMMANDS = ("list", "show", "flush", "delete", "hold", "release", "shaping", "webhooks", "suspend", "suspensions",
            "unsuspend", "bounce")


class CLIError(Exception):
    """A one-line error for the operator."""


def ask_control_socket(path: str, command: str, target: str | None, timeout: float = 30.0,
                       domain: str | None = None, args: dict[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Send one request; None when no MTA answers on ``path``."""
    if not os.path.exists(path):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        request: dict[str, Any] = {"cmd": command, "qid": target} | ({"domain": domain} if domain else {})
        request |= {"args": args} if args is not None else {}
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise CLIError("the MTA closed the control connection without answering")
    answer: dict[str, Any] = json.loads(data)
    return answer


def run_directly(config: Any, command: str, target: str | None, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same operations on the queue directory of a stopped MTA."""
    from twisted.internet import defer, task
    from twisted.python.threadpool import ThreadPool

    from pymta.admin.accounting import AccountingLog
    from pymta.admin.queue_ops import QueueOperations, QueueOpError
    from pymta.stores import queue_store

    if not os.path.isdir(config.queue_dir):
        raise CLIError(f"no queue at {config.queue_dir}")
    outcome: dict[str, Any] = {}

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        pool = ThreadPool(1, 2, name="pymta-queue")
        pool.start()
        accounting = None
        try:
            if config.log.accounting and command == "delete":  # the received records a never-attempted message owes
                path = os.path.join(config.log_dir, "accounting.jsonl")
                try:
                    accounting = AccountingLog(path, reactor, fsync=config.queue.fsync)
                except OSError as e:
                    raise QueueOpError(f"nothing deleted: cannot open the accounting log {path}: {e.strerror}") from None
            store = queue_store(config, reactor, pool)
            store.migrate()  # a queue left by the previous release, not yet started since the upgrade
            result = yield QueueOperations(store, accounting=accounting).run(command, target, args=args)
            outcome.update(ok=True, result=result)
        except QueueOpError as e:
            outcome.update(ok=False, error=str(e))
        finally:
            if accounting is not None:
                accounting.close()
            pool.stop()

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise CLIError(outcome.get("error") or "queue operation failed") from None
    return outcome


def webhooks_from_disk(config: Any) -> dict[str, Any]:
    """Webhook backlog and counts of a stopped MTA, from the event journal and the cursors."""
    from pymta.events.webhooks import status_from_disk

    if not config.webhooks:
        return {"ok": False, "error": "no [[webhooks]] are configured"}
    return {"ok": True, "result": {"webhooks": status_from_disk(config.state_dir, config.webhooks)}}


def _format_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def print_list(messages: list[dict[str, Any]], out: Any) -> None:
    if not messages:
        out.write("Mail queue is empty\n")
        return
    out.write(f"{'Queue ID':<26} {'State':<9} {'Size':>9} {'Arrival (UTC)':<19}  Sender/Recipient\n")
    for m in messages:
        out.write(
            f"{m['qid']:<26} {m['state']:<9} {m['size']:>9} {_format_time(m['arrival']):<19}  <{m['sender']}>\n"
        )
        for r in m["recipients"]:
            reply = r.get("reply") or {}
            why = f" ({reply.get('code')} {reply.get('enhanced', '')} {reply.get('text', '')})".rstrip() if reply else ""
            if reply.get("tls_policy"):
                why += f" [tls_policy {reply['tls_policy']}{', ' + reply['tls_failure'] if reply.get('tls_failure') else ''}]"
            out.write(f"{'':<58}  {r['address']} [{r['state']}]{why}\n")
    quarantined = sum(1 for m in messages if m["state"] == "corrupt")
    out.write(f"-- {len(messages)} message(s)" + (f", {quarantined} quarantined in corrupt/" if quarantined else "") + "\n")


def queue_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pymta-queue", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="configuration file (default: $PYMTA_CONFIG, else /etc/pymta/pymta.toml)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("qid", nargs="?", help="queue id (or 'all' for delete, hold, release); a domain for shaping")
    parser.add_argument("--domain", default=None, help="flush: only the deferred mail for this recipient domain; "
                        "suspend: this recipient domain")
    for kind in ("provider", "source", "campaign", "tenant"):
        parser.add_argument(f"--{kind}", default=None, help=f"suspend (bounce: campaign, tenant): this {kind}")
    parser.add_argument("--duration", default="1h", help="suspend: for how long (30m, 2h, 1d; default 1h)")
    parser.add_argument("--reason", default=None, help="suspend, bounce: why (shown with the suspension, in the DSN)")
    parser.add_argument("--limit", type=int, default=None, help="list: only the first N messages (oldest first)")
    args = parser.parse_args(argv)
    suspend_args = {"limit": args.limit} if args.command == "list" and args.limit is not None else None
    if args.command in ("suspend", "bounce"):
        suspend_args = {k: getattr(args, k) for k in ("domain", "provider", "source", "campaign", "tenant")
                        if getattr(args, k) is not None}  # fmt: skip
        suspend_args |= {"duration": args.duration} if args.command == "suspend" else {}
        suspend_args |= {"reason": args.reason} if args.reason else {}
    path = args.config or default_config_path()
    try:
        config = load_config(path)
        if args.command in ("show", "delete", "hold", "release", "unsuspend") and not args.qid:
            raise CLIError(f"{args.command} needs a queue id")
        if args.domain and args.command not in ("flush", "suspend", "bounce"):
            raise CLIError("--domain goes with flush, suspend or bounce only")
        domain = args.domain if args.command == "flush" else None
        answer = ask_control_socket(config.control_socket, args.command, args.qid, domain=domain, args=suspend_args)
        if answer is None:
            if args.command == "webhooks":
                answer = webhooks_from_disk(config)
            elif args.command in ("flush", "shaping", "suspend", "suspensions", "unsuspend", "bounce"):
                raise CLIError(f"{args.command} needs the running MTA: nothing answers on " + config.control_socket)
            else:
                answer = run_directly(config, args.command, args.qid, suspend_args)
    except ConfigError as e:
        sys.stderr.write(f"pymta-queue: configuration error: {e}\n")
        return 2
    except (CLIError, OSError, ValueError) as e:
        sys.stderr.write(f"pymta-queue: {e}\n")
        return 1
    if not answer.get("ok"):
        sys.stderr.write(f"pymta-queue: {answer.get('error')}\n")
        return 1
    result: Any = answer.get("result")
    if args.json or args.command != "list":
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    else:
        print_list(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(queue_main())


def suppress_main(argv: list[str] | None = None) -> int:
    """``pymta-suppress --config FILE list|add|remove|import|export``."""
    from pymta.stores import WallClock, suppression_store

    parser = argparse.ArgumentParser(prog="pymta-suppress", description="Manage the suppression list.")
    parser.add_argument("--config", default=None, help="configuration file (default: $PYMTA_CONFIG, else /etc/pymta/pymta.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print every suppression")
    add = sub.add_parser("add", help="suppress addresses")
    add.add_argument("addresses", nargs="+")
    add.add_argument("--reason", default="manual")
    add.add_argument("--scope", default=None, help="a sender domain (default: global)")
    add.add_argument("--source", default="manual", choices=("bounce", "complaint", "unsubscribe", "manual"))
    remove = sub.add_parser("remove", help="lift suppressions")
    remove.add_argument("addresses", nargs="+")
    remove.add_argument("--scope", default=None)
    imp = sub.add_parser("import", help="add suppressions from CSV (header with an 'address' column)")
    imp.add_argument("file", help="CSV file, or - for standard input")
    exp = sub.add_parser("export", help="write every suppression as CSV")
    exp.add_argument("file", nargs="?", default="-", help="CSV file, or - for standard output")
    args = parser.parse_args(argv)

    cluster = None
    try:
        config = load_config(args.config or default_config_path())
        if config.cluster.backend == "redis":  # changes go to the cluster's stream too
            from twisted.internet import reactor

            from pymta.state.cluster import make_cluster_state

            cluster = make_cluster_state(config, reactor, member=False)
        store = suppression_store(config, WallClock(), shared=cluster, start=False)
    except ConfigError as e:
        sys.stderr.write(f"pymta-suppress: configuration error: {e}\n")
        return 2
    except Exception as e:  # sqlite3 errors, permissions
        sys.stderr.write(f"pymta-suppress: cannot open {getattr(config, 'suppression_db', '?')}: {e}\n")
        return 1
    try:
        if args.command == "list":
            for entry in store.entries():
                scope = entry["scope"] or "global"
                until = _format_time(entry["expires"]) if entry["expires"] else "never"
                sys.stdout.write(
                    f"{entry['address']}\t{scope}\t{entry['source']}\t{entry['reason']}\tcount={entry['count']}"
                    f"\tlast={_format_time(entry['last_seen'])}\texpires={until}\n"
                )
        elif args.command == "add":
            for address in args.addresses:
                store.add(address, args.reason, args.source, args.scope)
        elif args.command == "remove":
            missing = [a for a in args.addresses if not store.remove(a, args.scope)]
            if missing:
                sys.stderr.write(f"pymta-suppress: not suppressed: {', '.join(missing)}\n")
                return 1
        elif args.command == "import":
            with sys.stdin if args.file == "-" else open(args.file, newline="", encoding="utf-8") as f:
                n = store.import_csv(f)
            sys.stderr.write(f"imported {n} suppression(s)\n")
        elif args.command == "export":
            with sys.stdout if args.file == "-" else open(args.file, "w", newline="", encoding="utf-8") as f:
                store.export_csv(f)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"pymta-suppress: {e}\n")
        return 1
    finally:
        if cluster is not None and args.command in ("add", "remove", "import"):
            from twisted.internet import reactor

            from pymta.state.replica import push_outbox

            left = push_outbox(store, reactor)
            if left:
                sys.stderr.write(f"pymta-suppress: Redis does not answer: {left} change(s) wait in "
                                 f"{config.suppression_db}; the node sends them when it does\n")  # fmt: skip
        store.close()
    return 0
