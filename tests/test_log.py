"""The JSON log observer: one object per line, Twisted's client factory lines left out."""

from __future__ import annotations

import io
import json

from twisted.internet import protocol
from twisted.logger import Logger, LogPublisher

from pymta.log import observer


def test_events_are_json_lines_and_twisted_factory_noise_is_dropped():
    out = io.StringIO()
    publisher = LogPublisher(observer(out))
    Logger(namespace="pymta.queue", observer=publisher).info("queued {qid}", qid="Q1", event="queued")
    noisy = protocol.Factory()
    # What Factory.doStart logs for a Twisted client factory (outbound HTTPS) and for our listener.
    Logger(namespace="twisted.web.client._HTTP11ClientFactory", observer=publisher).info(
        "Starting factory {factory!r}", factory=noisy)  # fmt: skip
    Logger(namespace="pymta.smtp.server.SMTPServerFactory", observer=publisher).info(
        "Starting factory {factory!r}", factory=noisy)  # fmt: skip
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["namespace"], e["message"][:16]) for e in lines] == [
        ("pymta.queue", "queued Q1"),
        ("pymta.smtp.server.SMTPServerFactory", "Starting factory"),  # a listener of ours stays
    ]
    assert lines[0]["qid"] == "Q1"
    assert lines[0]["event"] == "queued"
