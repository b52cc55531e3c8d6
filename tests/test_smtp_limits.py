"""Time limits a client cannot reset, the connection cap and input back-pressure of the SMTP
server, on in-memory transports with task.Clock (the trickle patterns of a slow-loris client)."""

from __future__ import annotations

from twisted.internet import defer

from pymta.smtp.replies import Reply
from pymta.smtp.server import ConnectionSlots, ServerLimits, SMTPServerFactory
from tests.test_smtp_server import Client, FakeDelegate, TLSStringTransport, transaction


def trickle(c: Client, data: bytes, every: float, steps: int) -> int:
    """Send ``data`` one byte every ``every`` seconds (at most ``steps`` bytes) until the server
    closes; returns how many bytes were sent."""
    sent = 0
    for byte in data[:steps]:
        if c.closed:
            break
        c.proto.dataReceived(bytes([byte]))
        sent += 1
        c.clock.advance(every)
    return sent


def queue_write_pending(limits: ServerLimits) -> Client:
    """A client in a transaction whose end of data will wait on the (deferred) queue write."""
    c = Client(limits)
    transaction(c)
    c.take()
    c.delegate.defer_message = True
    return c


# -- command_timeout is a deadline for a whole line ---------------------------------------------------


def test_a_command_line_trickled_a_byte_every_2s_is_cut_at_the_command_timeout():
    c = Client(ServerLimits(command_timeout=15, max_session_time=0))
    c.ready()
    trickle(c, b"MAIL FROM:<someone.with.a.long.address@example.org>\r\n", every=2, steps=60)
    assert c.closed
    assert 15 <= c.clock.seconds() <= 16  # not 15 s after the last byte: 15 s after the line began
    assert c.take().endswith(b"421 4.4.2 Timeout, closing connection\r\n")
    assert ("mail", "someone.with.a.long.address@example.org", {}) not in c.delegate.calls


def test_each_command_line_gets_its_own_deadline():
    c = Client(ServerLimits(command_timeout=15, max_session_time=0))
    c.ready()
    for _ in range(3):  # 3 lines of 10 s each: 30 s in all, each line within its 15 s
        trickle(c, b"NOOP\r\n", every=2, steps=6)
        assert not c.closed
        assert c.take() == b"250 2.0.0 OK\r\n"
    assert c.clock.seconds() == 36


def test_the_deadline_of_the_next_command_starts_with_our_answer():
    c = queue_write_pending(ServerLimits(command_timeout=15, max_session_time=0))
    c.send("DATA\r\nx\r\n.\r\nNO")  # a partial line waits behind the pending answer
    c.clock.advance(40)  # our own work is slow: not the client's fault
    assert not c.closed
    c.delegate.pending[0].callback(None)
    assert c.take().startswith(b"250")
    c.clock.advance(14)
    assert not c.closed
    assert c.send("OP\r\n") == b"250 2.0.0 OK\r\n"


# -- a session cap that NOOPs cannot defeat -------------------------------------------------------------


def test_noop_every_command_timeout_minus_3s_ends_at_the_session_cap():
    c = Client(ServerLimits(command_timeout=15, max_session_time=60))
    c.ready()
    replies = []
    for _ in range(20):
        if c.closed:
            break
        c.clock.advance(12)
        replies.append(c.send("NOOP\r\n"))
    assert c.closed
    assert replies[:4] == [b"250 2.0.0 OK\r\n"] * 4  # t = 12, 24, 36, 48
    assert replies[4] == b"421 4.4.2 Session time limit exceeded, closing connection\r\n"  # at t = 60
    assert c.clock.seconds() == 60


def test_the_session_cap_waits_for_a_pending_answer_then_closes():
    c = queue_write_pending(ServerLimits(command_timeout=15, max_session_time=100))
    for _ in range(9):  # an active client until t = 90
        c.clock.advance(10)
        c.send("NOOP\r\n")
    c.clock.advance(5)
    c.send("DATA\r\nx\r\n.\r\nNOOP\r\n")
    c.clock.advance(10)  # the cap passes while the queue write is pending
    assert not c.closed
    assert c.take() == b""
    c.delegate.pending[0].callback(Reply(250, "2.0.0", "Ok: queued as Q1"))
    # the message's answer is given, the pipelined NOOP is not: the session is over
    assert c.take() == b"250 2.0.0 Ok: queued as Q1\r\n421 4.4.2 Session time limit exceeded, closing connection\r\n"
    assert c.closed


def test_an_answer_that_never_comes_does_not_outlive_the_cap_by_more_than_a_command_timeout():
    c = queue_write_pending(ServerLimits(command_timeout=15, max_session_time=100))
    c.send("DATA\r\nx\r\n.\r\n")
    c.clock.advance(100)
    c.clock.advance(14)
    assert not c.closed
    c.clock.advance(2)
    assert c.closed
    assert c.take().endswith(b"421 4.4.2 Session time limit exceeded, closing connection\r\n")


# -- data_timeout: inactivity plus a minimum rate -------------------------------------------------------


def test_one_byte_every_2s_in_data_is_cut_by_the_minimum_rate():
    c = Client(ServerLimits(data_timeout=15, max_session_time=0))  # min_data_rate 1 KiB/s by default
    transaction(c)
    assert c.codes("DATA\r\n") == ["354"]
    trickle(c, b"x" * 100, every=2, steps=100)
    assert c.closed
    assert 30 < c.clock.seconds() <= 34  # the first byte after the 30 s grace
    assert c.take().endswith(b"421 4.4.2 Data rate too low, closing connection\r\n")
    assert c.delegate.messages == []


def test_one_byte_every_2s_in_bdat_chunks_is_cut_by_the_minimum_rate():
    c = Client(ServerLimits(data_timeout=15, command_timeout=15, max_session_time=0))
    transaction(c)
    c.take()
    out = b""
    for _ in range(40):  # BDAT 1 + one byte, every 2 s: commands and chunks together count
        if c.closed:
            break
        out += c.send("BDAT 1\r\nx")
        c.clock.advance(2)
    assert c.closed
    assert 30 < c.clock.seconds() <= 34
    assert out.startswith(b"250 2.0.0 1 octets received\r\n")
    assert out.endswith(b"421 4.4.2 Data rate too low, closing connection\r\n")


def test_a_big_bdat_chunk_trickled_is_cut_by_the_minimum_rate():
    c = Client(ServerLimits(data_timeout=15, max_session_time=0))
    transaction(c)
    c.send("BDAT 100000 LAST\r\n")
    trickle(c, b"y" * 100, every=2, steps=100)
    assert c.closed
    assert 30 < c.clock.seconds() <= 34


def test_data_at_the_minimum_rate_is_accepted_however_long_it_takes():
    c = Client(ServerLimits(data_timeout=15, max_session_time=0, max_message_size=10**6))
    transaction(c)
    c.send("DATA\r\n")
    line = b"z" * 1100 + b"\r\n"
    for _ in range(90):  # 1102 octets each second for 90 s, in lines of legal length
        c.send(line[:600])
        c.send(line[600:])
        c.clock.advance(1)
    assert not c.closed
    assert c.codes(".\r\n") == ["550 5.6.0"]  # (lines over 1000 octets) -- the transfer itself was fine
    c.take()
    assert not c.closed


def test_the_rate_counts_per_message():
    c = Client(ServerLimits(data_timeout=15, max_session_time=0))
    transaction(c)
    c.send("DATA\r\n" + "a" * 900 + "\r\n.\r\n")
    c.clock.advance(100)  # idle between messages (under no rate): a new line's deadline, not the rate
    c.send("MAIL FROM:<a@b.example>\r\n")
    c.clock.advance(14)
    c.send("RCPT TO:<x@y.example>\r\nDATA\r\n")
    c.clock.advance(10)
    out = c.send(("b" * 998 + "\r\n") * 20 + ".\r\n")  # 20 KB in 10 s: the clock started at this DATA
    assert out.startswith(b"250 2.0.0 Ok: queued")
    assert not c.closed


def test_data_inactivity_still_times_out():
    c = Client(ServerLimits(data_timeout=15, max_session_time=0))
    transaction(c)
    c.send("DATA\r\nsome data\r\n")
    c.clock.advance(14)
    assert not c.closed
    c.clock.advance(2)
    assert c.closed
    assert c.take().endswith(b"421 4.4.2 Timeout, closing connection\r\n")


# -- the connection cap ---------------------------------------------------------------------------------


def connect(factory: SMTPServerFactory) -> tuple:
    proto = factory.buildProtocol(None)
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_connections_past_the_cap_get_421_470_and_the_delegate_never_sees_them():
    delegate = FakeDelegate()
    slots = ConnectionSlots(2)
    mx = SMTPServerFactory(delegate, "mx.example.test", ServerLimits(), Client().clock, connections=slots)
    tls = SMTPServerFactory(delegate, "mx.example.test", ServerLimits(), Client().clock, connections=slots)
    first, t1 = connect(mx)
    _second, t2 = connect(tls)  # listeners given the same slots share the cap
    third, t3 = connect(mx)
    assert t1.value().startswith(b"220 ")
    assert t2.value().startswith(b"220 ")
    assert t3.value() == b"421 4.7.0 Too many connections, try again later\r\n"
    assert t3.disconnecting
    assert delegate.calls.count(("connected",)) == 2
    third.connectionLost(None)
    assert delegate.calls.count(("disconnected",)) == 0
    assert slots.active == 2
    first.connectionLost(None)
    assert slots.active == 1
    _fourth, t4 = connect(mx)
    assert t4.value().startswith(b"220 ")


def test_a_closed_session_gives_its_slot_back_once():
    slots = ConnectionSlots(1)
    factory = SMTPServerFactory(FakeDelegate(), "mx.example.test", ServerLimits(), Client().clock, connections=slots)
    proto, _transport = connect(factory)
    proto.dataReceived(b"QUIT\r\n")
    proto.connectionLost(None)
    proto.connectionLost(None)
    assert slots.active == 0


# -- back-pressure --------------------------------------------------------------------------------------


def test_input_behind_a_pending_answer_is_bounded_and_the_transport_paused():
    c = queue_write_pending(ServerLimits(max_pending_input=65536))
    c.send("DATA\r\nfirst\r\n.\r\n")
    chunk = b"NOOP\r\n" * 2731  # 16 KiB
    sent = 0
    for _ in range(1000):  # a client that keeps sending while it may: stops when paused
        if c.transport.producerState == "paused":
            break
        c.proto.dataReceived(chunk)
        sent += 1
    assert c.transport.producerState == "paused"
    assert c.proto.input_paused
    assert c.proto.buffered_input <= 65536 + len(chunk)
    assert sent < 10
    assert c.take() == b""  # nothing answered out of turn
    c.delegate.pending[0].callback(Reply(250, "2.0.0", "Ok: queued as Q1"))
    out = c.take().split(b"\r\n")
    assert out[0] == b"250 2.0.0 Ok: queued as Q1"  # in order: the pending answer, then every NOOP
    assert out[1:] == [b"250 2.0.0 OK"] * (2731 * sent) + [b""]
    assert c.transport.producerState == "producing"
    assert not c.proto.input_paused
    assert c.proto.buffered_input == 0


def test_input_before_the_greeting_is_bounded_too():
    delegate = FakeDelegate()
    pending = defer.Deferred()
    delegate.answers["connected"] = pending
    c = Client.__new__(Client)
    c.clock = Client().clock
    c.delegate = delegate
    c.factory = SMTPServerFactory(delegate, "mx.example.test", ServerLimits(max_pending_input=4096), c.clock)
    c.proto = c.factory.buildProtocol(None)
    c.transport = TLSStringTransport()
    c.proto.makeConnection(c.transport)
    for _ in range(100):
        if c.transport.producerState == "paused":
            break
        c.proto.dataReceived(b"EHLO early.example\r\n" * 50)
    assert c.transport.producerState == "paused"
    assert c.proto.buffered_input <= 4096 + 1000
    pending.callback(None)
    assert c.take().startswith(b"220 ")
    assert c.transport.producerState == "producing"


def test_a_client_that_does_not_read_is_answered_no_further_and_then_not_read():
    c = Client(ServerLimits(max_pending_input=4096))
    c.ready()
    c.proto.pauseProducing()  # what the transport does when its send buffer is full
    assert c.send("NOOP\r\nNOOP\r\n") == b""  # held, not answered into a full buffer
    assert c.transport.producerState == "producing"  # (TLS may have to read before it can write)
    for _ in range(100):
        if c.transport.producerState == "paused":
            break
        c.send(b"NOOP\r\n" * 100)
    assert c.transport.producerState == "paused"
    assert c.proto.buffered_input <= 4096 + 600
    held = c.proto.buffered_input // 6
    c.proto.resumeProducing()
    assert c.transport.producerState == "producing"
    assert c.take() == b"250 2.0.0 OK\r\n" * held
