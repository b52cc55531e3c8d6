"""Behaviour every ISMTPServerDelegate must show for a willing client: a mixin over a
``make_delegate()`` hook returning a delegate that accepts ``recipient``; ``settle(delegate)``
lets a delegate that holds its final reply give it (the default does nothing)."""

from __future__ import annotations

from twisted.internet import defer
from zope.interface.verify import verifyObject

from pymta.interfaces import ISMTPServerDelegate
from pymta.smtp.replies import Reply
from tests.sessions import Accepted, Sess, Txn

BODY = b"From: a@example.org\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class SMTPServerDelegateContract:
    """The ISMTPServerDelegate contract."""

    recipient = "bob@example.test"

    def make_delegate(self):
        raise NotImplementedError

    def settle(self, delegate) -> None:
        pass

    def test_delegate_provides_the_interface(self):
        self.assertTrue(verifyObject(ISMTPServerDelegate, self.make_delegate()))

    def test_each_stage_of_a_willing_client_is_answered_positively(self):
        delegate = self.make_delegate()
        session = Sess(peer_address="127.0.0.1", transaction=None)
        answers: dict[str, list] = {}
        stages = (
            ("connected", lambda: delegate.connected(session)),
            ("helo", lambda: delegate.helo(session, "client.example.org")),
            ("mail", lambda: delegate.mail_from(session, "a@example.org", {})),
            ("rcpt", lambda: delegate.rcpt_to(session, self.recipient, {})),
            ("message", lambda: delegate.message(session, BODY)),
        )
        for name, call in stages:
            if name == "mail":
                session.transaction = Txn(sender="a@example.org")
            if name == "message":
                session.transaction.recipients.append(Accepted(self.recipient))
            answers[name] = []
            defer.maybeDeferred(call).addBoth(answers[name].append)
            if name == "message":
                self.settle(delegate)
            self.assertEqual(len(answers[name]), 1, f"{name} has not answered")
            [answer] = answers[name]
            self.assertTrue(answer is None or isinstance(answer, Reply), (name, answer))
            self.assertTrue(answer is None or answer.code // 100 == 2, (name, answer))
        delegate.disconnected(session)
