"""TLS reports (RFC 8460) about our own domains, receiving side: mail to ``[tlsrpt]
report_addresses`` is parsed (the JSON report gzipped or plain, as a MIME part or the whole body)
and its per-policy counts kept in SQLite; a report that cannot be read is logged and kept aside
as a file, and never stops the feedback processor. ``pymta-tlsrpt`` lists what was received."""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import sqlite3
import sys
import zlib
from dataclasses import dataclass
from typing import Any, cast

from twisted.logger import Logger

log = Logger(namespace="pymta.feedback.tlsrpt")

MAX_REPORT = 8 * 1024 * 1024  # decompressed JSON larger than this is refused (a gzip bomb)
MAX_POLICIES = 1000
_REPORT_TYPES = ("application/tlsrpt+gzip", "application/tlsrpt+json", "application/gzip", "application/json",
                 "application/x-gzip")  # fmt: skip


class ReportError(Exception):
    """The mail holds no readable TLS report; the text says why."""


@dataclass(frozen=True)
class PolicyCounts:
    organization: str
    report_id: str
    day: str
    policy_domain: str
    policy_type: str
    successes: int
    failures: dict[str, int]


def _json_of(data: bytes) -> Any:
    if data[:2] == b"\x1f\x8b":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = d.decompress(data, MAX_REPORT + 1)
        except zlib.error as e:
            raise ReportError(f"gzip data unreadable: {e}") from None
        if len(data) > MAX_REPORT:
            raise ReportError(f"report larger than {MAX_REPORT} bytes once decompressed")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"not JSON: {e}") from None


def extract_report(body: bytes) -> Any:
    """The report's JSON object from a mail: a tlsrpt (or gzip/json) part, else the whole body."""
    msg = email.message_from_bytes(body[: MAX_REPORT * 2], policy=email.policy.compat32)
    candidates: list[bytes] = []  # get_payload(decode=True) of a leaf part: bytes
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = (part.get_filename() or "").lower()
        if ctype in _REPORT_TYPES or name.endswith((".json", ".json.gz", ".gz")):
            candidates.append(cast(bytes, part.get_payload(decode=True)) or b"")
    if not candidates and not msg.is_multipart():
        candidates.append(cast(bytes, msg.get_payload(decode=True)) or b"")
    if not candidates:
        raise ReportError("no report part (application/tlsrpt+gzip or +json) in the mail")
    return _json_of(candidates[0].strip())


def parse_report(data: Any) -> list[PolicyCounts]:
    """The counts of a report object (RFC 8460 §4.4); ReportError when it is not one."""
    if not isinstance(data, dict):
        raise ReportError("the report is not a JSON object")
    try:
        org = str(data["organization-name"])[:200]
        report_id = str(data["report-id"])[:200]
        day = str(data["date-range"]["start-datetime"])[:10]
        policies = data["policies"]
        if not isinstance(policies, list) or len(policies) > MAX_POLICIES:
            raise ReportError("policies is not a list (or too long)")
        out = []
        for entry in policies:
            policy, summary = entry["policy"], entry["summary"]
            failures: dict[str, int] = {}
            for detail in entry.get("failure-details") or []:
                kind = str(detail["result-type"])[:60]
                failures[kind] = failures.get(kind, 0) + int(detail["failed-session-count"])
            total_failed = int(summary["total-failure-session-count"])
            if total_failed > sum(failures.values()):
                failures["(not detailed)"] = total_failed - sum(failures.values())
            out.append(PolicyCounts(org, report_id, day, str(policy["policy-domain"])[:253], str(policy["policy-type"])[:20],
                                    int(summary["total-successful-session-count"]), failures))  # fmt: skip
        return out
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"not an RFC 8460 report: missing or bad {e}") from None


class TLSReportInbox:
    """Keeps received reports (SQLite) and the unreadable ones (files in ``bad_dir``)."""

    def __init__(self, path: str, bad_dir: str, addresses: tuple[str, ...] = ()) -> None:
        self.addresses = frozenset(a.lower() for a in addresses)
        self.bad_dir = bad_dir
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS received (organization TEXT, report_id TEXT, day TEXT, policy_domain TEXT,"
            " policy_type TEXT, successes INTEGER, failures TEXT, PRIMARY KEY (organization, report_id, policy_domain,"
            " policy_type))"
        )
        self.db.commit()

    def take(self, qid: str, body: bytes) -> str:
        """Keep the report in ``body``; what was done (for the feedback log). Never raises."""
        try:
            counts = parse_report(extract_report(body))
        except ReportError as e:
            return self._aside(qid, body, str(e))
        except Exception as e:  # whatever the mail holds, the processor goes on
            return self._aside(qid, body, f"{type(e).__name__}: {e}")
        try:
            for c in counts:
                self.db.execute("INSERT OR REPLACE INTO received VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (c.organization, c.report_id, c.day, c.policy_domain, c.policy_type, c.successes,
                                 json.dumps(c.failures, sort_keys=True)))  # fmt: skip
            self.db.commit()
        except sqlite3.Error as e:
            return self._aside(qid, body, f"not stored: {e}")
        orgs = sorted({c.organization for c in counts})
        log.info("TLS report from {org} kept: {n} policies", org=", ".join(orgs), n=len(counts), qid=qid,
                 event="tlsrpt_received")  # fmt: skip
        return f"TLS report kept ({len(counts)} policies)"

    def _aside(self, qid: str, body: bytes, why: str) -> str:
        os.makedirs(self.bad_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.bad_dir, f"{qid}.eml")
        try:
            with open(path, "wb") as f:
                f.write(body)
        except OSError as e:
            why += f" (and not kept aside: {e.strerror})"
            path = ""
        log.warn("unreadable TLS report {qid} kept aside in {path}: {why}", qid=qid, path=path, why=why,
                 event="tlsrpt_bad")  # fmt: skip
        return f"TLS report unreadable, kept aside: {why}"

    def summary(self) -> list[dict[str, Any]]:
        """Per reporting organisation and day: successes and failures by result type."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for org, day, successes, failures in self.db.execute(
            "SELECT organization, day, successes, failures FROM received ORDER BY day, organization"
        ):
            row = out.setdefault((org, day), {"organization": org, "day": day, "successes": 0, "failures": {}})
            row["successes"] += successes
            for kind, n in json.loads(failures).items():
                row["failures"][kind] = row["failures"].get(kind, 0) + n
        return list(out.values())

    def close(self) -> None:
        self.db.close()


def tlsrpt_main(argv: list[str] | None = None) -> int:
    """``pymta-tlsrpt [--config FILE] [--json]``: the TLS reports received for our domains."""
    from pymta.config import ConfigError, default_config_path, load_config

    parser = argparse.ArgumentParser(prog="pymta-tlsrpt", description="List the TLS reports (RFC 8460) received.")
    parser.add_argument("--config", default=None, help="configuration file (default: $PYMTA_CONFIG, else /etc/pymta/pymta.toml)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config or default_config_path())
    except ConfigError as e:
        sys.stderr.write(f"pymta-tlsrpt: configuration error: {e}\n")
        return 2
    inbox = TLSReportInbox(*inbox_paths(config.state_dir))
    rows = inbox.summary()
    inbox.close()
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if not rows:
        sys.stdout.write("No TLS reports received\n")
    for r in rows:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "none"
        sys.stdout.write(f"{r['day']}  {r['organization']}: {r['successes']} successful, failed: {failed}\n")
    return 0


def inbox_paths(state_dir: str) -> tuple[str, str]:
    """(database, directory for unreadable reports) under ``state_dir``."""
    return os.path.join(state_dir, "tlsrpt-received.sqlite"), os.path.join(state_dir, "tlsrpt-bad")
