"""Scripted content scanners on loopback for the tests: a milter (MTA talks to it over TCP) and an
rspamd-like HTTP server answering /checkv2. Both run in threads and record what they were sent."""

from __future__ import annotations

import contextlib
import json
import socketserver
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def _z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


class _ThreadedServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve_tcp(handler: type) -> tuple[socketserver.ThreadingTCPServer, int]:
    """A threaded TCP server on a free loopback port, serving in a daemon thread; (server, port)."""
    server = _ThreadedServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def close_server(server: socketserver.BaseServer) -> None:
    server.shutdown()
    server.server_close()


class ScriptedMilter:
    """``mode`` decides the end-of-message answer: accept (with ``add`` headers, ``change``
    headers), reject (``y`` with ``reply``), tempfail, quarantine, discard, hang (never answers),
    garbage (not the milter protocol), rcpt_reject (refuses at RCPT). ``protocol``: the steps
    the milter asks to skip / not to answer (SMFIP_*)."""

    def __init__(self) -> None:
        self.mode = "accept"
        self.reply = b"554 5.7.1 Virus found: Eicar-Test-Signature"
        self.add: list[tuple[str, str]] = [("X-Milter", "scanned")]
        self.change: list[tuple[int, str, str]] = []
        self.protocol = 0
        self.seen: list[dict] = []  # per connection: macros, envelope, headers, body
        milter = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):  # the MTA gave up on us (timeout, protocol error): expected
                    self.converse()

            def converse(self) -> None:
                sock = self.request
                sock.settimeout(30)
                state = {"macros": {}, "rcpts": [], "headers": [], "body": b"", "commands": []}
                milter.seen.append(state)
                buffer = b""
                while True:
                    while len(buffer) < 4 or len(buffer) < 4 + struct.unpack("!I", buffer[:4])[0]:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    length = struct.unpack("!I", buffer[:4])[0]
                    packet, buffer = buffer[4 : 4 + length], buffer[4 + length :]
                    command, data = packet[:1], packet[1:]
                    state["commands"].append(command)
                    answer = milter.answer(state, command, data)
                    if answer is None:
                        continue
                    if answer == b"HANG":
                        time.sleep(10)
                        return
                    sock.sendall(answer)
                    if command == b"Q":
                        return

        self.server, self.port = serve_tcp(Handler)

    def close(self) -> None:
        close_server(self.server)

    def answer(self, state: dict, command: bytes, data: bytes) -> bytes | None:
        if self.mode == "garbage":
            return b"HTTP/1.0 400 Bad Request\r\n\r\n"
        if command == b"O":
            return _packet(b"O", struct.pack("!III", 6, 0x31, self.protocol))
        if command == b"D":
            parts = data[1:].split(b"\0")
            for name, value in zip(parts[::2], parts[1::2], strict=False):
                state["macros"][name.decode()] = value.decode()
            return None
        if command == b"Q":
            return None
        if command == b"M":
            state["sender"] = data.split(b"\0")[0].decode()
        elif command == b"R":
            state["rcpts"].append(data.split(b"\0")[0].decode())
            if self.mode == "rcpt_reject":
                return _packet(b"y", b"550 5.7.1 Recipient refused by policy\0")
        elif command == b"L":
            name, value = data.split(b"\0")[:2]
            state["headers"].append((name.decode(), value.decode()))
        elif command == b"B":
            state["body"] += data
        elif command == b"E":
            return self.end_of_message()
        elif command == b"C":
            state["connect"] = data
        if self.protocol & {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
                            b"L": 0x80, b"N": 0x40000, b"B": 0x80000}.get(command, 0):  # fmt: skip
            return None
        return _packet(b"c")

    def end_of_message(self) -> bytes:
        if self.mode == "hang":
            return b"HANG"
        if self.mode == "reject":
            return _packet(b"y", self.reply + b"\0")
        if self.mode == "tempfail":
            return _packet(b"t")
        if self.mode == "discard":
            return _packet(b"d")
        out = _packet(b"p")  # progress first: the MTA keeps waiting
        for name, value in self.add:
            out += _packet(b"h", _z(name, value))
        for index, name, value in self.change:
            out += _packet(b"m", struct.pack("!I", index) + _z(name, value))
        if self.mode == "quarantine":
            out += _packet(b"q", _z("virus suspected"))
        return out + _packet(b"a")


class ScriptedRspamd:
    """Answers POST /checkv2 with ``answer`` (a dict, JSON-encoded) or ``raw`` bytes; records requests."""

    def __init__(self) -> None:
        self.answer: dict = {"action": "no action", "score": 0.5}
        self.raw: bytes | None = None
        self.delay = 0.0
        self.requests: list[tuple[str, list[tuple[str, str]], bytes]] = []
        scanner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                scanner.requests.append((self.path, list(self.headers.items()), body))
                if scanner.delay:
                    time.sleep(scanner.delay)
                out = scanner.raw if scanner.raw is not None else json.dumps(scanner.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        close_server(self.server)
