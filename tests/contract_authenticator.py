"""Behaviour every SMTP AUTH authenticator (``pymta.inbound.auth.Authenticator`` and its stand-ins)
must show, as the server reads it: a mixin over a ``make_authenticator(users, max_failures)`` hook,
``users`` mapping each user name to its password.

The boundary is not a zope interface: ``check``, ``failed`` and ``succeeded`` are exercised as the
server calls them."""

from __future__ import annotations

from twisted.internet import defer

USERS = {"app": "right", "other": "also right"}


class AuthenticatorContract:
    """The authenticator contract."""

    def make_authenticator(self, users: dict[str, str], max_failures: int):
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_only_the_right_password_of_a_known_user_passes(self):
        auth = self.make_authenticator(USERS, 3)
        answers = []
        for user, password in (("app", "right"), ("app", "wrong"), ("app", "also right"), ("nobody", "right"),
                               ("other", "also right"), ("App", "right")):  # fmt: skip
            answers.append((yield auth.check(user, password)))
        self.assertEqual(answers, [True, False, False, False, True, False])

    def test_a_client_is_told_to_go_after_max_failures_in_a_row(self):
        auth = self.make_authenticator(USERS, 3)
        self.assertEqual([auth.failed("192.0.2.1") for _ in range(3)], [False, False, True])

    def test_failures_count_per_client_and_a_success_forgets_them(self):
        auth = self.make_authenticator(USERS, 2)
        self.assertFalse(auth.failed("192.0.2.1"))
        self.assertFalse(auth.failed("192.0.2.2"))  # another client: its own count
        auth.succeeded("192.0.2.1")
        self.assertFalse(auth.failed("192.0.2.1"))
        self.assertTrue(auth.failed("192.0.2.1"))
