"""TLS reporting (RFC 8460) both ways: session counts kept across a restart and a daily report
mailed (multipart/report, gzipped JSON) and posted, on an injected clock; reports about our own
domains read by the feedback processor, bad ones kept aside, and listed by pymta-tlsrpt."""

from __future__ import annotations

import datetime
import email
import gzip
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived

from pymta.envelope import Envelope, Recipient, new_qid
from pymta.feedback.processor import FeedbackProcessor
from pymta.feedback.tlsrpt import TLSReportInbox, extract_report, inbox_paths, parse_report, tlsrpt_main
from pymta.outbound.tlsrpt import TLSCounts, TLSReporter, https_poster, parse_tlsrpt_txt, report_mail
from tests.fakes import StaticResolver
from tests.mta_process import free_port
from tests.pki import make_ca, server_options

DAY = datetime.datetime(2026, 12, 1, 10, 0, tzinfo=datetime.UTC).timestamp()
STS = ["version: STSv1", "mode: enforce", "mx: mx.sts.test", "max_age: 86400"]


def reporter(tmp_path, clock, submitted, posted) -> TLSReporter:
    resolver = StaticResolver({"_smtp._tls.sts.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tls@sts.test,https://reports.sts.test/in"]}})

    def post(url, data):
        posted.append((url, data))
        return defer.succeed(200)

    return TLSReporter(clock, resolver, TLSCounts(str(tmp_path / "tlsrpt.sqlite")), "Example Org", "ops@example.org",
                       "mx.example.org", lambda env, body: submitted.append((env, body)), post)  # fmt: skip


def test_the_rua_of_the_txt_record():
    assert parse_tlsrpt_txt(["v=TLSRPTv1; rua=mailto:a@b.test, https://r.test/x"]) == ["mailto:a@b.test", "https://r.test/x"]
    assert parse_tlsrpt_txt(["v=TLSRPTv1;rua=ftp://x,mailto:c@d.test"]) == ["mailto:c@d.test"]
    assert parse_tlsrpt_txt(["v=spf1 -all"]) == []
    assert parse_tlsrpt_txt(["v=TLSRPTv1; rua=mailto:a@b", "v=TLSRPTv1;"]) == []


def test_counts_survive_a_restart_and_the_daily_report_goes_out_after_midnight(tmp_path):
    clock = task.Clock()
    clock.advance(DAY)
    submitted: list = []
    posted: list = []
    first = reporter(tmp_path, clock, submitted, posted)
    for _ in range(3):
        first.session("sts.test", "sts", STS, "mx.sts.test", "192.0.2.1", None)
    first.session("sts.test", "sts", STS, "mx.sts.test", "192.0.2.1", "starttls-not-supported")
    first.session("quiet.test", "tlsa", ["3 1 1 ab"], "mx.quiet.test", "192.0.2.2", None)  # asks for no report
    first.counts.close()  # a restart
    r = reporter(tmp_path, clock, submitted, posted)
    r.start()
    clock.advance(3600)
    assert submitted == []  # the day is not over
    r.session("sts.test", "sts", STS, "mx.sts.test", "192.0.2.1", "certificate-expired")
    clock.advance(14 * 3600)  # past midnight UTC and the sending delay
    [(env, body)] = submitted
    assert [x.address for x in env.recipients] == ["tls@sts.test"]
    assert env.recipients[0].notify == ("NEVER",)
    msg = email.message_from_bytes(body)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "sts.test"
    assert msg["TLS-Report-Submitter"] == "Example Org"
    [part] = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(part.get_payload(decode=True)))
    assert report["date-range"] == {"start-datetime": "2026-12-01T00:00:00Z", "end-datetime": "2026-12-01T23:59:59Z"}
    assert report["organization-name"] == "Example Org"
    assert report["contact-info"] == "ops@example.org"
    [policy] = report["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-string": STS, "policy-domain": "sts.test",
                                "mx-host": ["mx.sts.test"]}  # fmt: skip
    assert policy["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 2}
    assert sorted((d["result-type"], d["failed-session-count"]) for d in policy["failure-details"]) == [
        ("certificate-expired", 1), ("starttls-not-supported", 1)]
    [(url, data)] = posted
    assert url == "https://reports.sts.test/in"
    assert json.loads(gzip.decompress(data))["report-id"] == report["report-id"]
    # Sent once: the next day brings nothing new; the domain without rua was dropped.
    clock.advance(86400)
    assert len(submitted) == 1
    assert r.counts.due("2099-01-01") == []
    r.stop()


def test_reports_for_our_domains_are_kept_and_bad_ones_set_aside(tmp_path):
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        inbox = TLSReportInbox(*inbox_paths(str(tmp_path)), addresses=("tlsrpt@example.org",))
        processor = FeedbackProcessor(None, None, tls_reports=inbox)
        report = {"organization-name": "Big Mail", "date-range": {"start-datetime": "2026-12-01T00:00:00Z",
                  "end-datetime": "2026-12-01T23:59:59Z"}, "contact-info": "x", "report-id": "r1", "policies": [
                  {"policy": {"policy-type": "sts", "policy-string": [], "policy-domain": "example.org"},
                   "summary": {"total-successful-session-count": 7, "total-failure-session-count": 2},
                   "failure-details": [{"result-type": "certificate-expired", "failed-session-count": 2}]}]}  # fmt: skip
        mailed = report_mail(report, "example.org", "r@big.test", ["tlsrpt@example.org"], "big.test", DAY)
        plain = b"Subject: report\r\nContent-Type: application/tlsrpt+json\r\n\r\n" + json.dumps(
            dict(report, **{"report-id": "r2"})).encode()  # fmt: skip
        bad = b"Subject: report\r\n\r\nthis is not JSON\r\n"
        outcomes = []
        for body in (mailed, plain, bad):
            env = Envelope(qid=new_qid(), sender="r@big.test", recipients=[Recipient("tlsrpt@example.org", route="feedback")])
            [result] = yield_now(processor.deliver(env, env.recipients, body))
            outcomes.append((result.code, result.text))
        assert [c for c, _ in outcomes] == [250, 250, 250]  # never a crash, never a bounce
        assert "kept aside" in outcomes[2][1]
        assert "not JSON" in outcomes[2][1]
        assert os.listdir(inbox_paths(str(tmp_path))[1])
        assert [e for e in events if e.get("event") == "tlsrpt_bad"]
        assert inbox.summary() == [{"organization": "Big Mail", "day": "2026-12-01", "successes": 14,
                                    "failures": {"certificate-expired": 4}}]  # fmt: skip
        assert parse_report(extract_report(mailed))[0].successes == 7
        inbox.close()
    finally:
        globalLogPublisher.removeObserver(events.append)


def yield_now(d: defer.Deferred):
    out: list = []
    d.addBoth(out.append)
    assert out, "the processor answered synchronously"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_pymta_tlsrpt_lists_per_organisation_and_day(tmp_path, capsys):
    state = tmp_path / "state"
    inbox = TLSReportInbox(*inbox_paths(str(state)))
    inbox.take("Q1", b"\r\n" + json.dumps({"organization-name": "Big Mail", "report-id": "r1",
               "date-range": {"start-datetime": "2026-12-01T00:00:00Z"}, "policies": [
               {"policy": {"policy-type": "tlsa", "policy-domain": "example.org"},
                "summary": {"total-successful-session-count": 5, "total-failure-session-count": 1},
                "failure-details": [{"result-type": "validation-failure", "failed-session-count": 1}]}]}).encode())  # fmt: skip
    inbox.close()
    config = tmp_path / "pymta.toml"
    config.write_text(f'state_dir = "{state}"\n')
    assert tlsrpt_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2026-12-01  Big Mail: 5 successful, failed: validation-failure 1" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[tlsrpt]\nreport_addresses = [\"nope\"]\n")
    assert tlsrpt_main(["--config", str(bad)]) == 2
    assert "tlsrpt.report_addresses" in capsys.readouterr().err



class Inbox(resource.Resource):
    """An https: rua on loopback: records each POST."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[bytes, bytes]] = []
        self.status = 200

    def render_POST(self, request):
        self.posts.append((request.getHeader(b"content-type"), request.content.read()))
        request.setResponseCode(self.status)
        return b"thanks"


class HTTPSPostTests(unittest.TestCase):
    """The https: rua: a real POST with Twisted's HTTP client to a loopback HTTPS server."""

    timeout = 30

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="pymta-rua-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.ca = make_ca(directory)
        self.stranger = make_ca(tempfile.mkdtemp(dir=directory), name="stranger")
        self.inbox = Inbox()
        self.port = free_port()
        listening = reactor.listenSSL(self.port, server.Site(self.inbox), server_options(*self.ca.issue("localhost")),
                                      interface="127.0.0.1")  # fmt: skip
        self.addCleanup(listening.stopListening)

    @defer.inlineCallbacks
    def test_a_report_is_posted_as_application_tlsrpt_gzip(self):
        post = https_poster(reactor, reactor, self.ca.cert_path)
        code = yield post(f"https://localhost:{self.port}/in", gzip.compress(b'{"report-id": "r"}'))
        assert code == 200
        [(ctype, data)] = self.inbox.posts
        assert ctype == b"application/tlsrpt+gzip"
        assert json.loads(gzip.decompress(data)) == {"report-id": "r"}
        self.inbox.status = 500
        with self.assertRaises(ValueError):
            yield post(f"https://localhost:{self.port}/in", b"x")

    @defer.inlineCallbacks
    def test_an_untrusted_report_host_gets_nothing(self):
        post = https_poster(reactor, reactor, self.stranger.cert_path)
        with self.assertRaises((ResponseNeverReceived, RequestTransmissionFailed)):  # the TLS handshake refused it
            yield post(f"https://localhost:{self.port}/in", b"x")
        assert self.inbox.posts == []
