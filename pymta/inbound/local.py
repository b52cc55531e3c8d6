"""Local submission (``pymta-sendmail``): the SMTP server on a UNIX socket, the submitting Unix user
taken from the kernel (SO_PEERCRED), not from anything the client says.

A local user may send anywhere (as with Postfix's sendmail/postdrop); the submitter goes into the
``Received:`` header, the envelope (``extra["submitter"]``) and the ``queued`` log record.
"""

from __future__ import annotations

import pwd
import socket
import struct
from typing import Any

from twisted.logger import Logger

from pymta.smtp.server import SMTPServerFactory, SMTPServerProtocol

log = Logger(namespace="pymta.inbound.local")


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a UNIX socket, or None."""
    try:
        sock = transport.getHandle()
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", raw)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class LocalSMTPServerProtocol(SMTPServerProtocol):
    """An SMTP session whose client is a local process: trusted, with its submitting user noted
    (a connection whose credentials cannot be read is refused)."""

    def connectionMade(self) -> None:
        creds = peer_credentials(self.transport)
        if creds is None:
            log.warn("local submission without peer credentials refused", event="local_refused")
            self.transport.loseConnection()
            return
        pid, uid, _ = creds
        self.session.notes["trusted"] = True
        self.session.notes["submitter"] = {"uid": uid, "user": user_name(uid), "pid": pid}
        super().connectionMade()


class LocalSubmissionFactory(SMTPServerFactory):
    protocol = LocalSMTPServerProtocol
