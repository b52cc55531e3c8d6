"""Per-client limits and greylisting hold across the listener processes of one node
(``[smtp] processes = 3``: two listener workers, the main process delivers) and greylist triples
across a restart, through the real twistd.

Which process accepts a connection is made certain by stopping the other one (SIGSTOP): a
stopped process cannot accept, so the running one does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest

from tests.mta_process import MTAProcess, wait_gone, wait_until

pytestmark = pytest.mark.timeout(180)

STRANGER_NET = "192.0.2.0/24"  # relay_from: the loopback test clients are strangers, so limits apply


def read_line(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + 30
    while not data.endswith(b"\r\n") and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def connect(mta: MTAProcess, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", mta.port), timeout=30, source_address=(source, 0))
    return sock, read_line(sock)


def command(sock: socket.socket, line: str) -> bytes:
    sock.sendall(line.encode() + b"\r\n")
    return read_line(sock)


def worker_pids(mta: MTAProcess, started: int = 2) -> list[int]:
    """The two listener workers, once ``started`` listeners have started in the log (the socket
    queues connections before that)."""
    pids = mta.wait_for(lambda: (pids := mta.children()) and len(pids) == 2 and pids, what="two listener workers")
    mta.wait_for(lambda: len([e for e in mta.log_events() if e["message"].startswith(
        f"SMTPServerFactory starting on {mta.port}")]) >= started, seconds=90, what="both workers listening")  # fmt: skip
    return pids


@contextlib.contextmanager
def only(running: int, stopped: int):
    """Connections made inside are accepted by ``running``: ``stopped`` is frozen meanwhile."""
    os.kill(stopped, signal.SIGSTOP)
    try:
        yield running
    finally:
        os.kill(stopped, signal.SIGCONT)


def test_connections_and_message_rates_per_client_count_across_listener_workers(tmp_path):
    mta = MTAProcess(str(tmp_path), relay_from=STRANGER_NET, smtp_extra="processes = 3",
                     extra_config='[limits]\nconnections_per_client = 5\nmessage_rate = "3/h, burst=3"\n').start()  # fmt: skip
    first, second = worker_pids(mta)
    held: list[socket.socket] = []
    try:
        greetings = []
        with only(second, stopped=first):
            for _ in range(3):
                sock, greeting = connect(mta, "127.0.0.7")
                held.append(sock)
                greetings.append(greeting[:9])
        with only(first, stopped=second):
            for _ in range(4):
                sock, greeting = connect(mta, "127.0.0.7")
                held.append(sock)
                greetings.append(greeting[:9])
        # 3 on the second + 2 on the first worker = the 5 allowed; the rest are turned away.
        assert greetings == [b"220 mx.ex"] * 5 + [b"421 4.7.0"] * 2, greetings
        # Messages: 3 per hour for this client, wherever its connections are served.
        for sock in held[:5]:
            assert command(sock, "EHLO client.example").startswith(b"250")
        mails = [command(sock, "MAIL FROM:<a@remote.example>")[:9] for sock in (held[0], held[1], held[3], held[4])]
        assert mails == [b"250 2.1.0"] * 3 + [b"450 4.7.1"], mails  # the 4th, on the first worker, waits
        other, greeting = connect(mta, "127.0.0.8")  # another client is not affected
        held.append(other)
        assert greeting.startswith(b"220 ")
        # Connections closed on the second worker free places for connections on the first worker.
        for sock in held[:3]:
            command(sock, "QUIT")
            sock.close()

        def accepted_on_first() -> bool:
            with only(first, stopped=second):
                sock, greeting = connect(mta, "127.0.0.7")
            held.append(sock)
            return greeting.startswith(b"220 ")

        mta.wait_for(accepted_on_first, seconds=15, what="a place freed by the second worker's closed connections")
    finally:
        for sock in held:
            sock.close()
        mta.stop()


def greylist_try(mta: MTAProcess, sender: str) -> bytes:
    sock, greeting = connect(mta, "127.0.0.9")
    with sock:
        assert greeting.startswith(b"220 ")
        command(sock, "EHLO client.example")
        assert command(sock, f"MAIL FROM:<{sender}>").startswith(b"250 ")
        reply = command(sock, "RCPT TO:<alice@example.test>")
        command(sock, "QUIT")
    return reply[:9]


def test_greylist_retries_pass_on_any_worker_and_after_a_restart(tmp_path):
    mta = MTAProcess(str(tmp_path), relay_from=STRANGER_NET, smtp_extra="processes = 3",
                     extra_config='[greylist]\nenabled = true\ndelay = "5s"\n').start()  # fmt: skip
    senders = [f"sender{i}@remote.example" for i in range(12)]
    first, second = worker_pids(mta)
    try:
        first_seen = time.monotonic()  # no sender was seen before this
        with only(second, stopped=first):
            tries = [(greylist_try(mta, s), time.monotonic()) for s in senders]
        assert [reply for reply, _ in tries] == [b"450 4.7.1"] * 12
        sixth_seen = tries[5][1]  # each sender's delay runs from its own first try: the sixth's ends last
        with only(first, stopped=second):
            # Too early, on the other process: every try that ended within the delay of the first
            # sighting is refused (on a slow machine the later ones may be past it).
            # The one exception: the shared state fails open, and says so, when its write cannot
            # take the database lock (a SIGSTOPped peer may hold it here).
            def failed_open() -> bool:
                return any(e.get("event") == "state_error" for e in mta.log_events())

            early = [(greylist_try(mta, s), time.monotonic()) for s in senders[:6]]
            in_delay = [reply for reply, at in early if at - first_seen < 5.0]
            assert in_delay == [b"450 4.7.1"] * len(in_delay) or failed_open(), early
            # Retried (at most 20 s) until the delay has passed: it never passes before.
            passed_at = wait_until(lambda: greylist_try(mta, senders[0]) == b"250 2.1.5" and time.monotonic(),
                                   20, "the greylisting delay to pass")  # fmt: skip
            assert passed_at - first_seen >= 5.0 or failed_open()
            time.sleep(max(0.0, sixth_seen + 5.0 - time.monotonic()))  # at most the delay
            assert [greylist_try(mta, s) for s in senders[:6]] == [b"250 2.1.5"] * 6
    finally:
        mta.stop()
    assert wait_gone([first, second], 20) == []  # a restart must not meet the old workers
    mta.start()
    worker_pids(mta, started=4)  # the log file goes on: two listeners before the restart, two after
    try:
        assert [greylist_try(mta, s) for s in senders[6:]] == [b"250 2.1.5"] * 6  # first seen before the restart
        assert greylist_try(mta, "new@remote.example") == b"450 4.7.1"
    finally:
        mta.stop()
