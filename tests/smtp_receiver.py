"""A loopback SMTP (and LMTP) server for end-to-end tests, one thread per session.

``ThreadedReceiver`` accepts, reads lines and stops, each bounded in time; ``ScriptedReceiver``
adds the one default dialogue (greeting, EHLO/LHLO, MAIL, RCPT, DATA with dot-unstuffing, RSET,
QUIT, "250 ok" otherwise) with small hooks for what a test wants to differ: the answer to MAIL and
to each RCPT, and what to do with a received message and what to answer after its final dot."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator


class ThreadedReceiver:
    accept_for = 200.0  # seconds the server accepts at most
    session_for = 150.0  # seconds a session lasts at most

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = socket.create_server((host, port))
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

    def hold(self, conn: socket.socket, seconds: float, until: threading.Event | None = None) -> None:
        """Waits ``seconds`` at most, less once ``until`` is set; raises OSError if the peer closes
        the connection or the receiver stops meanwhile."""
        end = time.monotonic() + seconds
        conn.settimeout(0.1)
        while time.monotonic() < end and not (until is not None and until.is_set()):
            if self.stopping.is_set():
                raise OSError("receiver stopping")
            try:
                if conn.recv(1, socket.MSG_PEEK) == b"":
                    raise OSError("peer closed")
            except TimeoutError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()
        self.thread.join(5)


def address_of(argument: bytes) -> str:
    """The address between the angle brackets of a MAIL or RCPT command ("" if there are none)."""
    inside = argument.partition(b"<")[2].partition(b">")[0]
    return inside.decode("utf-8", "replace")


class ScriptedReceiver(ThreadedReceiver):
    """The default dialogue. It counts sessions opened and closed, and transactions open (from an
    accepted MAIL to the answer after the final dot, a RSET or the end of the session) with the
    most ever open at once; subclasses override the hooks below."""

    name = b"sink.test"
    ehlo_keywords: tuple[bytes, ...] = (b"8BITMIME",)
    max_message = 64 << 20  # bytes of one message at most; past it the answer is 552

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.transactions_open = 0
        self.most_transactions_open = 0
        super().__init__(host, port)

    def on_mail(self, sender: str, peer: str) -> bytes:
        """The answer to MAIL; a 2xx answer opens a transaction."""
        return b"250 ok"

    def on_rcpt(self, address: str, peer: str) -> bytes:
        """The answer to one RCPT; only a 2xx answer adds the address to the transaction."""
        return b"250 ok"

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        """Called once the final dot has arrived, with the dot-unstuffed message (CRLF line ends);
        returns the answer (several CRLF-separated lines for LMTP); may wait (bounded) first."""
        return b"250 accepted"

    def on_answered(self, recipients: list[str], message: bytes, peer: str) -> None:
        """Called once the answer after the final dot has been sent."""

    def _transaction(self, opened: bool) -> None:
        with self.lock:
            self.transactions_open += 1 if opened else -1
            self.most_transactions_open = max(self.most_transactions_open, self.transactions_open)

    def _session(self, conn: socket.socket, peer: str) -> None:
        with self.lock:
            self.sessions_opened += 1
        in_transaction = False
        try:
            conn.sendall(b"220 " + self.name + b" ESMTP\r\n")
            source = self.lines(conn)
            recipients: list[str] = []
            for line in source:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"LHLO"):
                    *more, last = (self.name, *self.ehlo_keywords)
                    conn.sendall(b"".join(b"250-" + x + b"\r\n" for x in more) + b"250 " + last + b"\r\n")
                elif verb == b"MAIL":
                    reply = self.on_mail(address_of(line), peer)
                    recipients = []
                    if reply.startswith(b"2") and not in_transaction:
                        in_transaction = True
                        self._transaction(True)
                    conn.sendall(reply + b"\r\n")
                elif verb == b"RCPT":
                    address = address_of(line)
                    reply = self.on_rcpt(address, peer)
                    if reply.startswith(b"2"):
                        recipients.append(address)
                    conn.sendall(reply + b"\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    data: list[bytes] = []
                    size = 0
                    for data_line in source:
                        if data_line == b".":
                            break
                        size += len(data_line) + 2
                        if size <= self.max_message:
                            data.append(data_line[1:] if data_line.startswith(b".") else data_line)
                    else:
                        return
                    message = b"".join(x + b"\r\n" for x in data)
                    if size > self.max_message:
                        reply = b"552 5.3.4 message too big"
                    else:
                        reply = self.on_message(conn, recipients, message, peer)
                    if in_transaction:  # closed before the client hears so: it may look at once
                        in_transaction = False
                        self._transaction(False)
                    conn.sendall(reply + b"\r\n")
                    if size <= self.max_message:
                        self.on_answered(recipients, message, peer)
                    recipients = []
                elif verb == b"RSET":
                    recipients = []
                    if in_transaction:
                        in_transaction = False
                        self._transaction(False)
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            if in_transaction:
                self._transaction(False)
            conn.close()
            with self.lock:
                self.sessions_closed += 1
