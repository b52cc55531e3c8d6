"""Behaviour every webhook ``post(url, body, headers)`` (``pymta.events.webhooks.treq_post`` and its
stand-ins) must show, as the webhook sender reads it: a mixin over a ``make_post(answer)`` hook
returning ``(post, url)``, where the receiver at ``url`` answers every POST with the HTTP status
``answer``, or refuses the connection when ``answer`` is ``"refused"``.

The boundary is a callable, not a zope interface: it is exercised as the sender calls it."""

from __future__ import annotations

import json

from twisted.internet import defer, error

BODY = json.dumps({"events": [{"event": "delivered", "qid": "Q1"}]}).encode()
HEADERS = {"Content-Type": "application/json", "X-Pymta-Signature": "t=1,v1=00"}


class WebhookPostContract:
    """The webhook post contract."""

    def make_post(self, answer):
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_the_status_of_the_answer_is_the_result(self):
        for status in (200, 204, 400, 500, 503):
            post, url = self.make_post(status)
            self.assertEqual((yield post(url, BODY, HEADERS)), status)

    @defer.inlineCallbacks
    def test_a_refused_connection_is_a_failure_not_a_status(self):
        post, url = self.make_post("refused")
        with self.assertRaises(error.ConnectionRefusedError):
            yield post(url, BODY, HEADERS)
