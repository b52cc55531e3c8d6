"""certificate_problem judges a real TLS session against a given CA file or the system trust store."""

from __future__ import annotations

import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor, ssl
from twisted.trial import unittest

from pymta.tls import certificate_problem
from tests.pki import make_ca, server_options


class _Hello(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # the client reads this once the handshake is done


class _Reader(protocol.Protocol):
    def __init__(self, got: defer.Deferred[Any]) -> None:
        self.got = got

    def dataReceived(self, data: bytes) -> None:
        if not self.got.called:
            self.got.callback(self)


class CertificateProblemTest(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.ca = make_ca(tempfile.mkdtemp())
        server = protocol.Factory.forProtocol(_Hello)
        self.port = reactor.listenSSL(0, server, server_options(*self.ca.issue("mx.trust.test")),
                                      interface="127.0.0.1")  # fmt: skip
        self.addCleanup(self.port.stopListening)
        got: defer.Deferred[Any] = defer.Deferred()
        client = protocol.ClientFactory.forProtocol(lambda: _Reader(got))
        reactor.connectSSL(
            "127.0.0.1", self.port.getHost().port, client, ssl.CertificateOptions(verify=False)
        )
        self.client = yield got
        self.addCleanup(self.client.transport.abortConnection)

    def test_a_private_ca_is_not_in_the_system_trust_store(self) -> None:
        assert certificate_problem(self.client.transport, "mx.trust.test") == "certificate-not-trusted"

    def test_the_ca_file_makes_the_same_session_verify(self) -> None:
        assert certificate_problem(self.client.transport, "mx.trust.test", self.ca.cert_path) is None
        assert certificate_problem(self.client.transport, "other.trust.test", self.ca.cert_path) == (
            "certificate-host-mismatch"
        )
