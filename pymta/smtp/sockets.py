"""Socket options every SMTP connection gets."""

from __future__ import annotations

import contextlib
from typing import Any

from twisted.internet import tcp


def set_nodelay(transport: Any) -> None:
    """TCP_NODELAY (no Nagle stall on small SMTP replies); a no-op for transports without it."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        with contextlib.suppress(OSError):
            setter(True)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but what the socket takes at once is sent here.

    Twisted's TCP write only queues the data and has the reactor poll for writability: two
    ``epoll_ctl`` calls and one more turn of the loop for every SMTP answer. When nothing is
    queued before ``data`` on a plain TCP connection, it goes to the socket now; what the socket
    does not take, and everything on other transports (TLS, test transports, a connection
    closing), takes the usual way, so the order of the bytes and error handling are Twisted's.
    """
    # Exactly a TCP connection: wrappers (TLS on a listener, a test transport) may pass attribute
    # lookups on to the TCP connection below them, whose socket must not see their bytes. Its
    # write buffer is read through getattr: a Twisted that keeps it otherwise gets plain writes.
    if (
        isinstance(transport, tcp.Connection)
        and getattr(transport, "TLS", True) is False
        and transport.connected
        and not transport.disconnecting
        and getattr(transport, "_writeDisconnected", True) is False
        and getattr(transport, "_tempDataBuffer", None) == []
        and getattr(transport, "offset", -1) >= len(getattr(transport, "dataBuffer", b"?"))
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # would block, or the connection is failing: Twisted's write finds out
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
