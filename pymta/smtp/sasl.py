"""SASL for the server's AUTH command (RFC 4954): the PLAIN (RFC 4616) and LOGIN exchanges.

An exchange turns the client's lines into the next step: a challenge to send (``334``), the
credentials to check, or a refusal. Whether AUTH may be used at all (TLS, EHLO, no transaction)
and checking the credentials are the server's business.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from pymta.smtp.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <text>`` and wait for the client's next line."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete: check these."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The exchange ends without credentials; ``syntax``: the client sent something malformed
    (it counts as a client error)."""

    reply: Reply
    syntax: bool = False


Step = Challenge | Credentials | Refused


class SaslExchange:
    """One AUTH exchange for ``mechanism`` (one of :data:`MECHANISMS`)."""

    __slots__ = ("mechanism", "user")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.user: str | None = None  # LOGIN: the user name, once given

    def begin(self, initial: str) -> Step:
        """The first step, given the initial response on the AUTH line ("" for none)."""
        if not initial:
            return Challenge("" if self.mechanism == "PLAIN" else _USERNAME)
        if self.mechanism == "PLAIN":
            return self._plain(initial.encode())  # a "*" here is not a cancel: nothing was asked yet
        return self.respond(initial.encode())

    def respond(self, line: bytes) -> Step:
        """The next step, given the client's response line (without its CRLF)."""
        if line.strip() == b"*":
            return Refused(Reply(501, "5.0.0", "Authentication cancelled"))
        if self.mechanism == "PLAIN":
            return self._plain(line)
        try:
            value = _decode(line)
        except (binascii.Error, UnicodeDecodeError):
            return Refused(Reply(501, "5.5.2", "Cannot decode response"), syntax=True)
        if self.user is None:
            self.user = value
            return Challenge(_PASSWORD)
        return Credentials(self.user, value)

    @staticmethod
    def _plain(response: bytes) -> Step:
        try:
            _authzid, user, password = _decode(response).split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return Refused(Reply(501, "5.5.2", "Cannot decode AUTH PLAIN response"), syntax=True)
        return Credentials(user, password)


def start(mechanism: str) -> SaslExchange | None:
    """An exchange for the mechanism the client named (any case), or None when it is not offered."""
    mechanism = mechanism.upper()
    return SaslExchange(mechanism) if mechanism in MECHANISMS else None


def _decode(line: bytes) -> str:
    return base64.b64decode(line.strip(), validate=True).decode("utf-8")
