"""The scripted loopback receiver the end-to-end tests deliver to, driven by smtplib over TCP."""

from __future__ import annotations

import smtplib
import socket

from tests.mta_process import wait_until
from tests.smtp_receiver import ScriptedReceiver


class Refusing(ScriptedReceiver):
    max_message = 4096

    def __init__(self) -> None:
        self.got: list[tuple[list[str], bytes]] = []
        super().__init__()

    def on_rcpt(self, address: str, peer: str) -> bytes:
        return b"550 5.1.1 unknown" if address.startswith("bad") else b"250 2.1.5 ok"

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        self.got.append((recipients, message))
        return b"250 2.0.0 kept"


def test_the_default_dialogue_unstuffs_refuses_per_hook_bounds_and_counts():
    receiver = Refusing()
    try:
        with smtplib.SMTP("127.0.0.1", receiver.port, timeout=30) as client:
            code, features = client.ehlo("client.test")
            assert code == 250
            assert features.split(b"\n") == [b"sink.test", b"8BITMIME"]
            refused = client.sendmail("s@x.test", ["good@x.test", "bad@x.test"], b"Subject: a\r\n\r\n.dot\r\n")
            assert refused == {"bad@x.test": (550, b"5.1.1 unknown")}
            assert receiver.got == [(["good@x.test"], b"Subject: a\r\n\r\n.dot\r\n")]
            assert receiver.transactions_open == 0
            assert receiver.most_transactions_open == 1
            client.mail("s@x.test")
            client.rcpt("good@x.test")
            code, text = client.data(b"x" * 5000)
            assert (code, text) == (552, b"5.3.4 message too big")
            assert len(receiver.got) == 1
            client.mail("s@x.test")
            assert receiver.transactions_open == 1
            client.rset()
            assert receiver.transactions_open == 0
        wait_until(lambda: receiver.sessions_closed == 1, 10, "the session to close")
        assert receiver.sessions_opened == 1
    finally:
        receiver.stop()
