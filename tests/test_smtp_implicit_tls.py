"""The SMTP server on a transport that is TLS from the first byte (an ``ssl:`` listener,
RFC 8314): the session is encrypted at once, so AUTH is offered and STARTTLS is not."""

from __future__ import annotations

import base64

from twisted.internet import task
from twisted.internet.interfaces import ISSLTransport
from zope.interface import alsoProvides

from pymta.smtp.server import ServerLimits, SMTPServerFactory
from tests.test_smtp_server import FakeAuth, FakeDelegate, TLSStringTransport


def test_a_tls_transport_gets_auth_and_no_starttls_and_is_recorded_as_esmtpsa():
    factory = SMTPServerFactory(FakeDelegate(), "mx.example.test", ServerLimits(), task.Clock(),
                                tls_context_factory=object(), authenticator=FakeAuth())  # fmt: skip
    proto = factory.buildProtocol(None)
    transport = TLSStringTransport()
    alsoProvides(transport, ISSLTransport)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO client.example\r\n")
    extensions = {line[4:] for line in transport.value().decode().split("\r\n")[1:] if line}
    assert "AUTH PLAIN LOGIN" in extensions, extensions
    assert "STARTTLS" not in extensions, extensions
    transport.clear()
    proto.dataReceived(b"STARTTLS\r\nAUTH PLAIN " + base64.b64encode(b"\0app\0secret") + b"\r\n")
    assert transport.value().startswith(b"503 5.5.1")
    assert b"235 2.7.0" in transport.value()
    assert transport.tls_started is None
    assert proto.session.auth_user == "app"
    assert proto.session.protocol_name == "ESMTPSA"
