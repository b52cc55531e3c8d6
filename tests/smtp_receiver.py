"""A loopback SMTP server for end-to-end tests, one thread per session: subclasses script the
dialogue in ``_session``; accepting, line reading and stopping are here, each bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator


class ThreadedReceiver:
    accept_for = 200.0  # seconds the server accepts at most
    session_for = 150.0  # seconds a session lasts at most

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        deadline = time.monotonic() + self.accept_for
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                conn, peer = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn, peer[0]), daemon=True).start()

    def _session(self, conn: socket.socket, peer: str) -> None:
        raise NotImplementedError

    def lines(self, conn: socket.socket) -> Iterator[bytes]:
        """The session's lines (CRLF stripped) until the peer closes, the session's time runs out,
        or the receiver stops; a line over 1 MiB ends the session."""
        conn.settimeout(0.2)
        buf = b""
        deadline = time.monotonic() + self.session_for
        while time.monotonic() < deadline and not self.stopping.is_set():
            if b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                yield line
                continue
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data or len(buf) > 1 << 20:
                return
            buf += data

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()
        self.thread.join(5)
