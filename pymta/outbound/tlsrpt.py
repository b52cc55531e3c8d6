"""TLS reporting (RFC 8460), sending side: counts of TLS sessions per policy domain and day, kept
in SQLite (a restart loses none), and once a day a JSON report, gzipped, for each domain that
asks for one in its ``_smtp._tls`` TXT record: mailed (``multipart/report; report-type=tlsrpt``,
§5.3) through our own queue to ``mailto:`` addresses, POSTed with Twisted's HTTP client to
``https:`` ones."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import sqlite3
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.logger import Logger

from pymta.dns import DNSError

if TYPE_CHECKING:
    from twisted.web.iweb import IBodyProducer

log = Logger(namespace="pymta.outbound.tlsrpt")

# RFC 8460 §4.3 result types pymta can observe.
RESULT_TYPES = ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
                "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
                "sts-policy-invalid", "sts-webpki-invalid")  # fmt: skip
POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
MAX_RUA = 10  # at most this many report addresses per domain are used
MAX_FAILURE_DETAILS = 1000  # rows per policy in one report
SEND_DELAY = 600.0  # reports for a day go out this long after midnight UTC
HTTPS_TIMEOUT = 60.0


def result_type_of(text: str | None) -> str:
    """The RFC 8460 result type at the start of ``text`` (``"validation-failure: ..."``), else
    ``validation-failure``."""
    head = (text or "").split(":", 1)[0].strip()
    return head if head in RESULT_TYPES else "validation-failure"


def parse_tlsrpt_txt(records: list[str]) -> list[str]:
    """The ``rua`` URIs of ``v=TLSRPTv1`` (RFC 8460 §3): mailto: and https: only, at most MAX_RUA."""
    found = [r for r in records if re.match(r"^\s*v\s*=\s*TLSRPTv1\s*(;|$)", r)]
    if len(found) != 1:
        return []
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key.strip() == "rua":
            uris = [u.strip() for u in value.split(",") if u.strip()]
            return [u for u in uris if u.startswith(("mailto:", "https://"))][:MAX_RUA]
    return []


def day_of(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


class TLSCounts:
    """The session counts, in SQLite (one row per day, domain, policy, MX, address, result)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path)
        # One small commit per session on the reactor thread: WAL without an fsync per commit keeps
        # every count across a process restart (a power loss may cost the last ones).
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS sessions (day TEXT, domain TEXT, policy_type TEXT, policy TEXT, mx TEXT,"
            " ip TEXT, result TEXT, count INTEGER, PRIMARY KEY (day, domain, policy_type, mx, ip, result))"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS sent (day TEXT, domain TEXT, PRIMARY KEY (day, domain))")
        self.db.commit()

    def add(self, day: str, domain: str, policy_type: str, policy: list[str], mx: str, ip: str, result: str) -> None:
        """One session; ``result`` is "success" or an RFC 8460 result type."""
        self.db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (day, domain, policy_type, mx, ip, result)"
            " DO UPDATE SET count = count + 1, policy = excluded.policy",
            (day, domain, policy_type, json.dumps(policy), mx, ip, result),
        )
        self.db.commit()

    def due(self, before_day: str) -> list[tuple[str, str]]:
        """(day, domain) with counts before ``before_day`` and no report sent yet."""
        return list(self.db.execute(
            "SELECT DISTINCT s.day, s.domain FROM sessions s LEFT JOIN sent t ON s.day = t.day AND s.domain = t.domain"
            " WHERE s.day < ? AND t.day IS NULL ORDER BY s.day, s.domain", (before_day,)))  # fmt: skip

    def rows(self, day: str, domain: str) -> list[tuple[str, str, str, str, str, int]]:
        return list(self.db.execute("SELECT policy_type, policy, mx, ip, result, count FROM sessions WHERE day = ? AND"
                                    " domain = ? ORDER BY policy_type, mx, ip, result", (day, domain)))  # fmt: skip

    def mark_sent(self, day: str, domain: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?)", (day, domain))
        self.db.execute("DELETE FROM sessions WHERE day = ? AND domain = ?", (day, domain))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def build_report(day: str, domain: str, rows: list[tuple[str, str, str, str, str, int]], organization: str,
                 contact: str, report_id: str) -> dict[str, Any]:  # fmt: skip
    """The RFC 8460 §4 JSON report of one policy domain for one day."""
    policies: dict[str, dict[str, Any]] = {}
    for policy_type, policy, mx, ip, result, count in rows:
        entry = policies.setdefault(policy_type, {
            "policy": {"policy-type": policy_type, "policy-string": json.loads(policy), "policy-domain": domain,
                       "mx-host": []},
            "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
            "failure-details": [],
        })  # fmt: skip
        if mx and mx not in entry["policy"]["mx-host"]:
            entry["policy"]["mx-host"].append(mx)
        if result == "success":
            entry["summary"]["total-successful-session-count"] += count
            continue
        entry["summary"]["total-failure-session-count"] += count
        if len(entry["failure-details"]) < MAX_FAILURE_DETAILS:
            entry["failure-details"].append({"result-type": result, "receiving-mx-hostname": mx, "receiving-ip": ip,
                                             "failed-session-count": count})  # fmt: skip
    for entry in policies.values():
        if entry["policy"]["policy-type"] != "sts":
            entry["policy"].pop("mx-host")
        if not entry["failure-details"]:
            entry.pop("failure-details")
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": list(policies.values()),
    }


def report_mail(report: dict[str, Any], domain: str, sender: str, to: list[str], hostname: str, now: float) -> bytes:
    """The report as mail: ``multipart/report; report-type=tlsrpt`` with the gzipped JSON (§5.3)."""
    day = report["date-range"]["start-datetime"][:10]
    data = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {report['organization-name']} Report-ID: <{report['report-id']}>"
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = report["organization-name"]
    msg.set_content(f"This is an aggregate TLS report from {report['organization-name']} for {domain} on {day}.\n")
    name = f"{report['organization-name']}!{domain}!{day}T00:00:00Z!{day}T23:59:59Z!{report['report-id']}.json.gz"
    msg.add_attachment(data, maintype="application", subtype="tlsrpt+gzip", filename=re.sub(r"[^\w.!:-]", "_", name))
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class TLSReporter:
    """Counts sessions (:meth:`session`) and sends the reports of finished days (:meth:`send_due`;
    :meth:`start` schedules it daily on the injected clock). ``submit(envelope, body)`` puts a
    message into the queue (a Deferred); ``post(url, data)`` sends to an https: rua."""

    def __init__(self, clock: Any, resolver: Any, counts: TLSCounts, organization: str, contact: str, hostname: str,
                 submit: Callable[[Any, bytes], Any], post: Callable[[str, bytes], Any] | None = None) -> None:  # fmt: skip
        self.clock = clock
        self.resolver = resolver
        self.counts = counts
        self.organization = organization
        self.contact = contact
        self.hostname = hostname
        self.submit = submit
        self.post = post
        self.notify: Callable[[str], Any] = lambda qid: None  # the queue manager's notify_incoming, once wired
        self._call: Any = None
        self._running: defer.Deferred[Any] | None = None

    # -- counting ---------------------------------------------------------------------------------

    def session(self, domain: str, policy_type: str, policy: list[str], mx: str, ip: str, result: str | None) -> None:
        """One TLS session (or attempt) under a policy; ``result`` None is a success."""
        try:
            self.counts.add(day_of(self.clock.seconds()), domain, policy_type, policy, mx, ip, result or "success")
        except sqlite3.Error as e:
            log.error("TLS report counts not written: {why}", why=str(e), event="tlsrpt_count_failed")

    # -- sending ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        now = self.clock.seconds()
        midnight = (int(now) // 86400 + 1) * 86400
        self._call = self.clock.callLater(midnight + SEND_DELAY - now, self._tick)

    def _tick(self) -> None:
        d = self.send_due()
        d.addErrback(lambda f: log.failure("TLS reports not sent", f))
        self._schedule()

    def send_due(self) -> defer.Deferred[Any]:
        """Send every report of a finished day not sent yet; fires with the number sent."""
        if self._running is not None:
            return self._running
        d = self._running = self._send_due()

        def done(result: Any) -> Any:
            self._running = None
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _send_due(self) -> Any:
        today = day_of(self.clock.seconds())
        sent = 0
        for day, domain in self.counts.due(today):
            try:
                records = yield self.resolver.lookup_txt(f"_smtp._tls.{domain}")
            except DNSError as e:
                records = []
                log.info("no TLS report for {domain} ({day}): {why}", domain=domain, day=day, why=str(e))
            rua = parse_tlsrpt_txt(records)
            if rua:
                report_id = f"{day}.{uuid.uuid4().hex}@{self.hostname}"
                report = build_report(day, domain, self.counts.rows(day, domain), self.organization, self.contact,
                                      report_id)  # fmt: skip
                yield self._deliver(report, domain, rua)
                sent += 1
            self.counts.mark_sent(day, domain)  # a domain without rua: the counts are dropped
        return sent

    @defer.inlineCallbacks
    def _deliver(self, report: dict[str, Any], domain: str, rua: list[str]) -> Any:
        from pymta.envelope import ROUTE_RELAY, Envelope, Recipient, new_qid

        now = self.clock.seconds()
        mailto = [u[len("mailto:") :].split("?")[0] for u in rua if u.startswith("mailto:")]
        mailto = [a for a in mailto if "@" in a]
        if mailto:
            sender = f"noreply-tlsrpt@{self.hostname}"
            body = report_mail(report, domain, sender, mailto, self.hostname, now)
            env = Envelope(qid=new_qid(now), sender=sender, arrival=now, size=len(body), protocol="LOCAL",
                           recipients=[Recipient(a, route=ROUTE_RELAY, notify=("NEVER",)) for a in mailto],
                           extra={"tlsrpt": domain})  # fmt: skip
            yield defer.maybeDeferred(self.submit, env, body)
            log.info("TLS report {id} for {domain} queued as {qid} to {to}", id=report["report-id"], domain=domain,
                     qid=env.qid, to=mailto, event="tlsrpt_sent")  # fmt: skip
        data = gzip.compress(json.dumps(report).encode("utf-8"), mtime=0)
        for url in (u for u in rua if u.startswith("https://")):
            if self.post is None:
                continue
            try:
                code = yield self.post(url, data)
                log.info("TLS report {id} for {domain} posted to {url}: HTTP {code}", id=report["report-id"],
                         domain=domain, url=url, code=code, event="tlsrpt_posted")  # fmt: skip
            except Exception as e:
                log.warn("TLS report for {domain} not posted to {url}: {why}", domain=domain, url=url, why=str(e),
                         event="tlsrpt_post_failed")  # fmt: skip


def https_poster(reactor: Any, clock: Any, ca_file: str | None = None) -> Callable[[str, bytes], defer.Deferred[Any]]:
    """POST a gzipped report to an https: rua (RFC 8460 §5.4) with Twisted's HTTP client; fires
    with the status code, fails on a timeout or a status outside 2xx."""
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
    from twisted.web.http_headers import Headers

    from pymta.httpbody import BytesProducer, LimitedBody
    from pymta.tls import trust_root

    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file)))
    headers = Headers({b"Content-Type": [b"application/tlsrpt+gzip"], b"User-Agent": [b"pymta"]})

    @defer.inlineCallbacks
    def post(url: str, data: bytes) -> Any:
        producer = cast("IBodyProducer", BytesProducer(data))  # zope: no structural match without a plugin
        d = agent.request(b"POST", url.encode("ascii"), headers, producer)
        d.addTimeout(HTTPS_TIMEOUT, clock)
        response = yield d
        body: defer.Deferred[Any] = defer.Deferred()
        response.deliverBody(LimitedBody(body, 65536, ValueError, "answer"))  # read (bounded) and dropped
        body.addTimeout(HTTPS_TIMEOUT, clock)
        yield body
        if not 200 <= response.code < 300:
            raise ValueError(f"HTTP status {response.code}")
        return response.code

    return post
