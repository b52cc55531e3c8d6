"""Back-pressure of the SMTP server over real TCP on loopback: a client pipelining 50 MB behind a
pending answer, and a client that never reads its replies, cannot make the server hold more
than a bounded amount; every answer still comes, in order.

The client is a separate process (its buffers are not the server's memory); the server runs on
the real reactor in this process, where tracemalloc measures what it allocates."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pymta.smtp.replies import Reply
from pymta.smtp.server import ServerLimits, SMTPServerFactory
from tests.test_smtp_server import FakeDelegate

FLOOD = 50 * 1024 * 1024
HEAD = (
    b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nfirst\r\n.\r\n"
    b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n"
)

# argv: port, file with the bytes to send first, flood size, flood line, wait for stdin before
# reading, "tls" for implicit TLS. One thread drives the socket (non-blocking, select): an OpenSSL
# connection must not be read in one thread while another writes to it (its error state is shared,
# so a write could fail or wait for input that never comes and the flood would stop short).
CLIENT = textwrap.dedent(
    """
    import selectors, socket, ssl, sys, time
    port, head_file, size, line, wait = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    head = open(head_file, "rb").read()
    line = line.encode().decode("unicode_escape").encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(130)
    s.connect(("127.0.0.1", port))
    if sys.argv[6] == "tls":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        s = context.wrap_socket(s)
    s.setblocking(False)
    chunk = line * (65536 // len(line))
    rounds = -(-size // len(chunk))
    pieces = iter([head] + [chunk] * rounds + [b".\\r\\nQUIT\\r\\n" if line != b"NOOP\\r\\n" else b"QUIT\\r\\n"])
    piece = next(pieces)
    reading = wait != "wait"
    selector = selectors.DefaultSelector()
    if not reading:
        selector.register(sys.stdin, selectors.EVENT_READ)
    received = []
    registered = 0
    deadline = time.monotonic() + 130
    while time.monotonic() < deadline:
        progress = False
        if piece is not None:
            try:
                sent = s.send(piece)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                sent = 0
            if sent:
                progress = True
                piece = piece[sent:] or next(pieces, None)
                if piece is None:
                    print(rounds * len(chunk), file=sys.stderr, flush=True)
        if reading:
            try:
                data = s.recv(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                data = None
            if data == b"":
                break
            if data:
                received.append(data)
                progress = True
        if progress:
            continue
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if piece is not None else 0)
        if events != registered:
            if registered:
                selector.modify(s, events) if events else selector.unregister(s)
            elif events:
                selector.register(s, events)
            registered = events
        for key, _ in selector.select(1.0):
            if key.fileobj is sys.stdin:
                sys.stdin.readline()
                selector.unregister(sys.stdin)
                reading = True
    sys.stdout.buffer.write(b"".join(received))
    """
)


@pytest.mark.timeout(150)
class BackPressureTests(unittest.TestCase):
    timeout = 140

    def setUp(self) -> None:
        self.delegate = FakeDelegate()
        self.protocols: list = []
        self.max_buffered = 0
        self.factory = SMTPServerFactory(self.delegate, "mx.example.test",
                                         ServerLimits(max_message_size=1024 * 1024), reactor)  # fmt: skip
        build = self.factory.buildProtocol

        def build_watched(addr):
            proto = build(addr)
            self.protocols.append(proto)
            original = proto.dataReceived

            def data_received(data: bytes) -> None:
                original(data)
                self.max_buffered = max(self.max_buffered, proto.buffered_input)

            proto.dataReceived = data_received
            return proto

        self.factory.buildProtocol = build_watched
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.tmp = tempfile.mkdtemp()

    def client(self, head: bytes, size: int, line: str, wait: bool, tls: bool = False) -> subprocess.Popen:
        head_file = os.path.join(self.tmp, "head")
        with open(head_file, "wb") as f:
            f.write(head)
        self.out_path = os.path.join(self.tmp, "out")
        self.out = open(self.out_path, "wb")  # noqa: SIM115 (kept open beyond this block)
        self.addCleanup(self.out.close)
        args = [sys.executable, "-c", CLIENT, str(self.port.getHost().port), head_file, str(size), line,
                "wait" if wait else "go", "tls" if tls else "plain"]  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=self.out, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    @defer.inlineCallbacks
    def poll(self, predicate, what: str, tries: int = 1800):
        for _ in range(tries):  # at most a minute and a half
            if predicate():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    def replies(self) -> list[str]:
        with open(self.out_path, "rb") as f:
            lines = f.read().decode().split("\r\n")
        return [line.split(" ", 2)[0] + " " + line.split(" ", 2)[1] for line in lines if line[3:4] == " "]

    @defer.inlineCallbacks
    def flood_behind(self, pending: defer.Deferred, answer: Reply | None, size: int = FLOOD, tls: bool = False):
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        line = r"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
        proc = self.client(HEAD, size, line, False, tls)
        yield self.poll(lambda: self.protocols and self.protocols[0].input_paused, "the server to pause reading")
        for _ in range(10):  # while paused, nothing more is read: the buffered amount stays put
            yield task.deferLater(reactor, 0.02, lambda: None)
        held = self.protocols[0].buffered_input
        assert 65536 < held <= 2 * 65536, held
        pending.callback(answer)
        yield self.poll(lambda: proc.poll() is not None, "the client to finish")
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 16 * 1024 * 1024, peak  # 50 MB went through; the server never held much of it
        assert self.max_buffered <= 2 * 65536, self.max_buffered
        assert int(proc.stderr.read()) >= size
        return self.replies()

    def slow_first_queue_write(self) -> defer.Deferred:
        first = defer.Deferred()  # the first message waits on a slow queue write
        original = self.delegate.message

        def message(session, body):
            reply = original(session, body)
            return first if len(self.delegate.messages) == 1 else reply

        self.delegate.message = message
        return first

    @defer.inlineCallbacks
    def test_50_mb_pipelined_behind_the_queue_write_is_read_only_as_answers_go_out(self):
        first = self.slow_first_queue_write()
        replies = yield self.flood_behind(first, Reply(250, "2.0.0", "Ok: queued as Q1"))
        assert replies == ["220 mx.example.test", "250 DSN", "250 2.1.0", "250 2.1.5", "354 End",
                           "250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End", "552 5.3.4", "221 2.0.0"]  # fmt: skip
        assert self.delegate.messages[0][2] == b"first\r\n"
        assert len(self.delegate.messages) == 1

    @defer.inlineCallbacks
    def test_50_mb_pipelined_before_the_greeting_is_held_while_the_connect_check_runs(self):
        resolving = defer.Deferred()  # reverse DNS or a DNSBL still resolving
        self.delegate.answers["connected"] = resolving
        replies = yield self.flood_behind(resolving, None)
        assert replies == ["220 mx.example.test", "250 DSN", "250 2.1.0", "250 2.1.5", "354 End",
                           "250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End", "552 5.3.4", "221 2.0.0"]  # fmt: skip

    @defer.inlineCallbacks
    def test_a_client_that_never_reads_its_replies_stops_being_read(self):
        size = 1024 * 1024  # 174762 NOOPs: 2.4 MB of replies if nothing held the client back
        build = self.factory.buildProtocol

        def small_send_buffer(addr):
            proto = build(addr)
            made = proto.connectionMade

            def connection_made() -> None:
                import socket

                proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                made()

            proto.connectionMade = connection_made
            return proto

        self.factory.buildProtocol = small_send_buffer
        proc = self.client(b"EHLO client.example\r\n", size, r"NOOP\r\n", True)
        yield self.poll(lambda: self.protocols and self.protocols[0].input_paused, "the server to stop reading")
        assert self.max_buffered <= 2 * 65536
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        yield self.poll(lambda: proc.poll() is not None, "the client to finish")
        sent = int(proc.stderr.read())
        replies = self.replies()
        assert replies[:2] == ["220 mx.example.test", "250 DSN"]
        assert replies[2:-1] == ["250 2.0.0"] * (sent // 6)
        assert replies[-1] == "221 2.0.0"

    @defer.inlineCallbacks
    def test_implicit_tls_input_behind_the_queue_write_is_bounded_too(self):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from pymta.tls import ServerTLS
        from tests.test_e2e_tls import make_cert

        cert, key = make_cert(self.tmp)
        yield self.port.stopListening()
        wrapped = TLSMemoryBIOFactory(ServerTLS(cert, key), False, self.factory)
        self.port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        first = self.slow_first_queue_write()
        replies = yield self.flood_behind(first, Reply(250, "2.0.0", "Ok: queued as Q1"), size=8 * 1024 * 1024, tls=True)
        # Over TLS the EHLO reply ends with REQUIRETLS (RFC 8689), offered on TLS sessions only.
        assert replies == ["220 mx.example.test", "250 REQUIRETLS", "250 2.1.0", "250 2.1.5", "354 End",
                           "250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End", "552 5.3.4", "221 2.0.0"]  # fmt: skip
