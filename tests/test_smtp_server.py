"""The ESMTP server state machine on in-memory transports with task.Clock."""

from __future__ import annotations

import base64

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from pymta.interfaces import ISMTPServerDelegate
from pymta.smtp.content import BodyCollector, encode_data
from pymta.smtp.replies import Reply
from pymta.smtp.server import ServerLimits, SMTPServerFactory
from pymta.smtp.syntax import parse_path, xtext_decode


@implementer(ISMTPServerDelegate)
class FakeDelegate:
    """Answers every stage positively unless told otherwise; records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.answers: dict[str, object] = {}
        self.pending: list[defer.Deferred] = []
        self.defer_message = False

    def _answer(self, name: str):
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def connected(self, session):
        self.calls.append(("connected",))
        return self._answer("connected")

    def helo(self, session, name):
        self.calls.append(("helo", name))
        return self._answer("helo")

    def mail_from(self, session, sender, params):
        self.calls.append(("mail", sender, dict(params)))
        return self._answer("mail")

    def rcpt_to(self, session, address, params):
        self.calls.append(("rcpt", address, dict(params)))
        answer = self.answers.get("rcpt:" + address, self._answer("rcpt"))
        return answer

    def message(self, session, body):
        txn = session.transaction
        self.messages.append((txn.sender, [r.address for r in txn.recipients], body))
        self.calls.append(("message", len(body)))
        if self.defer_message:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return self._answer("message") or Reply(250, "2.0.0", f"Ok: queued as Q{len(self.messages)}")

    def disconnected(self, session):
        self.calls.append(("disconnected",))


class TLSStringTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=None)
        self.tls_started = None

    def startTLS(self, ctx):
        self.tls_started = ctx


class Client:
    """One connection to a server protocol over a StringTransport."""

    def __init__(self, limits: ServerLimits | None = None, tls: bool = False, authenticator=None) -> None:
        self.clock = task.Clock()
        self.delegate = FakeDelegate()
        self.factory = SMTPServerFactory(
            self.delegate, "mx.example.test", limits or ServerLimits(), self.clock,
            tls_context_factory=object() if tls else None, authenticator=authenticator,
        )  # fmt: skip
        self.proto = self.factory.buildProtocol(None)
        self.transport = TLSStringTransport()
        self.proto.makeConnection(self.transport)

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data: bytes | str) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        self.proto.dataReceived(data)
        return self.take()

    def codes(self, data: bytes | str) -> list[str]:
        """Final reply lines' "CODE ENH" (multi-line replies count once)."""
        out = []
        for line in self.send(data).decode().split("\r\n"):
            if len(line) >= 4 and line[3] == " ":
                words = line.split(" ")
                enhanced = words[1] if len(words) > 1 and words[1][:1].isdigit() and "." in words[1] else ""
                out.append(f"{words[0]} {enhanced}".strip())
        return out

    def ready(self) -> None:
        """Greeting and EHLO done."""
        self.take()
        self.send("EHLO client.example.org\r\n")

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


# -- greeting, EHLO, simple commands --------------------------------------------------------------


def test_greeting_and_ehlo_advertise_every_extension():
    c = Client()
    assert c.take() == b"220 mx.example.test ESMTP pymta\r\n"
    out = c.send("EHLO client.example.org\r\n").decode()
    lines = out.split("\r\n")[:-1]
    assert lines[0] == "250-mx.example.test"
    assert lines[-1].startswith("250 ")
    extensions = {line[4:] for line in lines[1:]}
    for ext in ("PIPELINING", "SIZE 36700160", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"):
        assert ext in extensions
    assert "STARTTLS" not in extensions


def test_helo_noop_rset_vrfy_help_quit():
    c = Client()
    c.take()
    assert c.send("HELO client.example.org\r\n") == b"250 mx.example.test\r\n"
    assert c.codes("NOOP\r\nRSET\r\nVRFY alice\r\nHELP\r\n") == ["250 2.0.0", "250 2.0.0", "252 2.5.0", "214 2.0.0"]
    assert c.codes("quit\r\n") == ["221 2.0.0"]
    assert c.closed


def test_ehlo_without_a_name_is_501_554():
    c = Client()
    c.take()
    assert c.codes("EHLO\r\n") == ["501 5.5.4"]


def test_unknown_commands_get_500_and_too_many_disconnect():
    c = Client(ServerLimits(max_errors=3))
    c.take()
    assert c.codes("FOO\r\n") == ["500 5.5.2"]
    assert c.codes("BAR\r\n") == ["500 5.5.2"]
    assert c.codes("BAZ\r\n") == ["500 5.5.2", "421 4.7.0"]
    assert c.closed


def test_http_request_is_refused_at_once():
    c = Client()
    c.take()
    assert c.codes("GET / HTTP/1.1\r\n") == ["421 4.7.0"]
    assert c.closed


def test_command_line_over_512_octets_is_refused_and_not_parsed():
    c = Client()
    c.ready()
    long_line = "NOOP " + "x" * 600 + "\r\n"
    assert c.codes(long_line) == ["500 5.5.2"]
    # A long line arriving in pieces: its tail is never read as a command.
    assert c.codes("NOOP " + "y" * 520) == ["500 5.5.2"]
    assert c.codes("QUIT\r\nNOOP\r\n") == ["250 2.0.0"]


def test_nul_in_a_command_is_refused():
    c = Client()
    c.ready()
    assert c.codes("NO\0OP\r\n") == ["500 5.5.2"]


def test_bare_lf_ends_a_command_line():
    c = Client()
    c.take()
    assert c.codes("EHLO x\nNOOP\n") == ["250", "250 2.0.0"]


# -- MAIL / RCPT ----------------------------------------------------------------------------------------


def test_sequence_errors_are_503_551():
    c = Client()
    c.take()
    assert c.codes("MAIL FROM:<a@b.example>\r\n") == ["503 5.5.1"]
    c.send("EHLO x\r\n")
    assert c.codes("RCPT TO:<a@b.example>\r\n") == ["503 5.5.1"]
    assert c.codes("DATA\r\n") == ["503 5.5.1"]
    assert c.codes("MAIL FROM:<a@b.example>\r\n") == ["250 2.1.0"]
    assert c.codes("MAIL FROM:<a@b.example>\r\n") == ["503 5.5.1"]
    assert c.codes("DATA\r\n") == ["554 5.5.1"]


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:a@b.example", "501 5.1.7"),
        ("MAIL FROM:<a@b.example", "501 5.5.4"),
        ("MAIL TO:<a@b.example>", "501 5.5.2"),
        ("MAIL FROM:<a b@b.example>", "501 5.1.7"),
        ("MAIL FROM:<a@b.example> SIZE=99999999999", "552 5.3.4"),
        ("MAIL FROM:<a@b.example> SIZE=abc", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> BODY=BINARYMIME", "555 5.5.4"),
        ("MAIL FROM:<a@b.example> FOO=bar", "555 5.5.4"),
        ("MAIL FROM:<a@b.example> RET=SOME", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> ENVID=a+zz", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> SIZE=1 SIZE=2", "501 5.5.4"),
        ("MAIL FROM:<jörg@b.example>", "553 5.6.7"),
    ],
)
def test_bad_mail_commands(command, code):
    c = Client()
    c.ready()
    assert c.codes(command + "\r\n") == [code]
    assert not any(call[0] == "mail" for call in c.delegate.calls)


def test_mail_parameters_are_parsed_into_the_transaction():
    c = Client()
    c.ready()
    c.send("MAIL FROM:<a@B.Example> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=hdrs ENVID=x+2By\r\n")
    txn = c.proto.session.transaction
    assert (txn.sender, txn.declared_size, txn.body_type, txn.smtputf8, txn.ret, txn.envid) == (
        "a@b.example", 100, "8BITMIME", True, "HDRS", "x+y",
    )  # fmt: skip


def test_smtputf8_allows_non_ascii_addresses():
    c = Client()
    c.ready()
    assert c.codes("MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n") == ["250 2.1.0"]
    assert c.codes("RCPT TO:<δοκιμή@παράδειγμα.example>\r\n") == ["250 2.1.5"]


def test_null_sender_and_postmaster():
    c = Client()
    c.ready()
    assert c.codes("MAIL FROM:<>\r\n") == ["250 2.1.0"]
    assert c.proto.session.transaction.sender == ""
    assert c.codes("RCPT TO:<Postmaster>\r\n") == ["250 2.1.5"]
    assert c.codes("RCPT TO:<>\r\n") == ["501 5.1.3"]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        ("NOTIFY=SOMETIMES", "501 5.5.4"),
        ("NOTIFY=", "501 5.5.4"),
        ("ORCPT=rfc822", "501 5.5.4"),
        ("ORCPT=rfc822;a+zz", "501 5.5.4"),
        ("XYZ=1", "555 5.5.4"),
    ],
)
def test_bad_rcpt_parameters(params, code):
    c = Client()
    c.ready()
    c.send("MAIL FROM:<a@b.example>\r\n")
    assert c.codes(f"RCPT TO:<x@y.example> {params}\r\n") == [code]


def test_dsn_parameters_are_kept_per_recipient():
    c = Client()
    c.ready()
    c.send("MAIL FROM:<a@b.example>\r\n")
    c.send("RCPT TO:<x@y.example> NOTIFY=success,failure ORCPT=rfc822;x+40y.example\r\n")
    [r] = c.proto.session.transaction.recipients
    assert r.notify == ("SUCCESS", "FAILURE")
    assert r.orcpt == "rfc822;x@y.example"


def test_parameters_need_ehlo():
    c = Client()
    c.take()
    c.send("HELO x\r\n")
    assert c.codes("MAIL FROM:<a@b.example> SIZE=10\r\n") == ["555 5.5.4"]


def test_recipient_cap_is_452_453():
    c = Client(ServerLimits(max_recipients=2))
    c.ready()
    c.send("MAIL FROM:<a@b.example>\r\n")
    assert c.codes("RCPT TO:<1@y.example>\r\nRCPT TO:<2@y.example>\r\nRCPT TO:<3@y.example>\r\n") == [
        "250 2.1.5", "250 2.1.5", "452 4.5.3",
    ]  # fmt: skip


def test_delegate_refusal_is_passed_through_and_the_recipient_not_added():
    c = Client()
    c.ready()
    c.delegate.answers["rcpt:no@y.example"] = Reply(550, "5.7.1", "Relay access denied")
    c.send("MAIL FROM:<a@b.example>\r\n")
    assert c.codes("RCPT TO:<no@y.example>\r\nRCPT TO:<ok@y.example>\r\n") == ["550 5.7.1", "250 2.1.5"]
    assert [r.address for r in c.proto.session.transaction.recipients] == ["ok@y.example"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<User@Example.TEST>", "User@example.test"),
        ("<@relay.example,@other.example:user@example.test>", "user@example.test"),
        ('<"john doe"@example.test>', '"john doe"@example.test'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<user@example.test.>", "user@example.test"),
        ("<>", ""),
    ],
)
def test_paths_parse(path, expected):
    assert parse_path(path) == expected


@pytest.mark.parametrize("path", ["user@example.test", "<user>", "<user@>", "<@x:>", "<a@[300.1.1.1]>", "<a..b@x.test>"])
def test_bad_paths_raise(path):
    with pytest.raises(ValueError):
        parse_path(path)


def test_xtext():
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    with pytest.raises(ValueError):
        xtext_decode("a+2b")


# -- DATA -----------------------------------------------------------------------------------------------


def transaction(c: Client) -> None:
    c.ready()
    c.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n")


def test_data_is_unstuffed_and_delivered_once():
    c = Client()
    transaction(c)
    assert c.codes("DATA\r\n") == ["354"]
    body = b"Subject: t\r\n\r\n..leading dot\r\n.\r\n"[:-3]  # the client stuffs "." -> ".."
    assert c.codes(body + b".\r\n") == ["250 2.0.0"]
    assert c.delegate.messages == [("a@b.example", ["x@y.example"], b"Subject: t\r\n\r\n.leading dot\r\n")]
    assert c.proto.session.transaction is None


def test_data_arriving_byte_by_byte_and_dot_at_chunk_boundaries():
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    content = b"line1\r\n..dot\r\n" + b"x" * 998 + b"\r\n...\r\nend\r\n.\r\n"
    out = b""
    for i in range(len(content)):
        out += c.send(content[i : i + 1])
    assert out.startswith(b"250 2.0.0")
    assert c.delegate.messages[0][2] == b"line1\r\n.dot\r\n" + b"x" * 998 + b"\r\n..\r\nend\r\n"


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 16384])
def test_end_of_data_split_across_chunks(split):
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    body = (b"a" * 78 + b"\r\n") * 256
    content = body + b".\r\nQUIT\r\n"
    cut = len(body) - 2 + split if split < 6 else split  # small splits fall inside CRLF.CRLF
    first = c.send(content[:cut])
    second = c.send(content[cut:])
    assert (first + second).split(b"\r\n")[:2] == [b"250 2.0.0 Ok: queued as Q1", b"221 2.0.0 Bye"]
    assert c.delegate.messages[0][2] == body


def test_empty_message():
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    assert c.codes(".\r\n") == ["250 2.0.0"]
    assert c.delegate.messages[0][2] == b""


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n"],
)
def test_smtp_smuggling_variants_never_end_data_or_start_a_second_transaction(smuggle):
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    hidden = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nSpoofed\r\n"
    out = c.send(b"Subject: hi\r\n\r\nbody" + smuggle + hidden + b".\r\n")
    # Exactly one reply: the message is refused for its bare CR/LF; nothing hidden became a command.
    assert out.count(b"\r\n") == 1
    assert out.startswith(b"550 5.6.0")
    assert c.delegate.messages == []
    assert not any(call[0] == "mail" and call[1] == "evil@x.example" for call in c.delegate.calls)
    assert c.codes("NOOP\r\n") == ["250 2.0.0"]


@pytest.mark.parametrize("bad", [b"bare\nlf\r\n", b"bare\rcr\r\n", b"nul\0here\r\n"])
def test_bare_cr_lf_and_nul_in_data_are_refused(bad):
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    assert c.codes(b"ok line\r\n" + bad + b".\r\n") == ["550 5.6.0"]
    assert c.delegate.messages == []


def test_long_line_is_refused_at_end_of_data_and_stays_in_data_mode():
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    # Over 1000 octets with CRLF; what follows looks like commands but is still message data.
    out = c.send(b"x" * 999 + b"\r\nRSET\r\nQUIT\r\n")
    assert out == b""
    assert c.codes(".\r\n") == ["550 5.6.0"]
    assert not c.closed
    assert c.delegate.messages == []


def test_a_line_of_exactly_1000_octets_is_fine():
    c = Client()
    transaction(c)
    c.send("DATA\r\n")
    assert c.codes(b"x" * 998 + b"\r\n.\r\n") == ["250 2.0.0"]


def test_oversized_message_is_552_after_the_data():
    c = Client(ServerLimits(max_message_size=1024))
    transaction(c)
    c.send("DATA\r\n")
    assert c.send(b"y" * 500 + b"\r\n") == b""
    assert c.send(b"y" * 700 + b"\r\n") == b""
    assert c.codes(b".\r\n") == ["552 5.3.4"]
    assert c.delegate.messages == []


def test_pipelined_transaction_gets_replies_in_order_in_one_write():
    c = Client()
    c.take()
    writes = []
    original = c.transport.write
    c.transport.write = lambda data: (writes.append(data), original(data))
    out = c.send(
        "EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<1@y.example>\r\nRCPT TO:<2@y.example>\r\nDATA\r\n"
    )
    assert [line[:3] for line in out.decode().split("\r\n")[-5:-1]] == ["250", "250", "250", "354"]
    assert len(writes) == 1
    assert c.codes("body\r\n.\r\nMAIL FROM:<c@d.example>\r\nRCPT TO:<3@y.example>\r\nDATA\r\nb2\r\n.\r\nQUIT\r\n") == [
        "250 2.0.0", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0",
    ]  # fmt: skip
    assert [m[1] for m in c.delegate.messages] == [["1@y.example", "2@y.example"], ["3@y.example"]]


def test_delegate_deferred_holds_pipelined_commands_until_it_fires():
    c = Client()
    transaction(c)
    c.delegate.defer_message = True
    c.send("DATA\r\n")
    assert c.send("body\r\n.\r\nNOOP\r\nQUIT\r\n") == b""  # nothing answered before the message is durable
    assert len(c.delegate.pending) == 1
    c.delegate.pending[0].callback(Reply(250, "2.0.0", "Ok: queued as LATE"))
    assert c.take() == b"250 2.0.0 Ok: queued as LATE\r\n250 2.0.0 OK\r\n221 2.0.0 Bye\r\n"


def test_delegate_failure_is_451_430_and_the_session_goes_on():
    c = Client()
    transaction(c)
    c.delegate.defer_message = True
    c.send("DATA\r\n")
    c.send("body\r\n.\r\n")
    c.delegate.pending[0].errback(RuntimeError("disk on fire"))
    assert c.take().startswith(b"451 4.3.0")
    assert c.codes("NOOP\r\n") == ["250 2.0.0"]


def test_delegate_raising_is_451_430():
    c = Client()
    c.take()
    c.delegate.answers["helo"] = RuntimeError("bug")
    assert c.codes("EHLO x\r\n") == ["451 4.3.0"]


# -- BDAT -----------------------------------------------------------------------------------------------


def test_bdat_chunks_and_last():
    c = Client()
    transaction(c)
    assert c.codes(b"BDAT 7\r\nHello\r\nBDAT 8 LAST\r\n.World\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert c.delegate.messages[0][2] == b"Hello\r\n.World\r\n"  # no dot-unstuffing in BDAT


def test_bdat_zero_last_and_data_after_bdat():
    c = Client()
    transaction(c)
    assert c.codes(b"BDAT 3\r\nabc") == ["250 2.0.0"]
    assert c.codes(b"DATA\r\n") == ["503 5.5.1"]
    assert c.codes(b"BDAT 0 LAST\r\n") == ["250 2.0.0"]
    assert c.delegate.messages[0][2] == b"abc"


def test_bdat_without_transaction_still_consumes_the_chunk():
    c = Client()
    c.ready()
    assert c.codes(b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n") == ["503 5.5.1", "250 2.0.0"]
    assert not c.closed


def test_bdat_over_the_size_limit_is_552():
    c = Client(ServerLimits(max_message_size=1024))
    transaction(c)
    assert c.codes(b"BDAT 2000 LAST\r\n" + b"z" * 2000) == ["552 5.3.4"]
    assert c.delegate.messages == []


def test_bdat_syntax():
    c = Client()
    transaction(c)
    assert c.codes(b"BDAT abc\r\n") == ["501 5.5.4"]
    assert c.codes(b"BDAT 1 FIRST\r\n") == ["501 5.5.4"]


# -- timeouts -------------------------------------------------------------------------------------------


def test_command_timeout_is_421_442():
    c = Client(ServerLimits(command_timeout=300, data_timeout=600))
    c.take()
    c.clock.advance(299)
    assert not c.closed
    c.clock.advance(2)
    assert c.take().startswith(b"421 4.4.2")
    assert c.closed


def test_data_timeout_uses_its_own_limit():
    c = Client(ServerLimits(command_timeout=10, data_timeout=100, min_data_rate=0))
    transaction(c)
    c.send("DATA\r\n")
    c.clock.advance(50)
    c.send(b"more data\r\n")
    c.clock.advance(99)
    assert not c.closed
    c.clock.advance(2)
    assert c.take().startswith(b"421 4.4.2")
    assert c.closed


def test_no_timeout_while_the_delegate_works():
    c = Client(ServerLimits(command_timeout=10))
    transaction(c)
    c.delegate.defer_message = True
    c.send("DATA\r\nx\r\n.\r\n")
    c.clock.advance(60)
    assert not c.closed
    c.delegate.pending[0].callback(None)
    assert c.take().startswith(b"250")


def test_greet_pause_refuses_early_talkers():
    c = Client(ServerLimits(greet_pause=1.0))
    assert c.take() == b""
    assert c.codes("EHLO eager\r\n") == ["554 5.5.1"]
    assert c.closed
    patient = Client(ServerLimits(greet_pause=1.0))
    patient.clock.advance(1.0)
    assert patient.take().startswith(b"220 ")


def test_refused_connection_gets_the_reply_and_is_closed():
    c = Client.__new__(Client)
    c.clock = task.Clock()
    c.delegate = FakeDelegate()
    c.delegate.answers["connected"] = Reply(554, "5.7.1", "Go away")
    c.factory = SMTPServerFactory(c.delegate, "mx.example.test", ServerLimits(), c.clock)
    c.proto = c.factory.buildProtocol(None)
    c.transport = TLSStringTransport()
    c.proto.makeConnection(c.transport)
    assert c.take() == b"554 5.7.1 Go away\r\n"
    assert c.closed


# -- STARTTLS and AUTH ----------------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_resets_the_session():
    c = Client(tls=True)
    c.ready()
    assert c.codes("STARTTLS\r\nRSET\r\nMAIL FROM:<a@b.example>\r\n") == ["220 2.0.0"]
    assert c.transport.tls_started is c.factory.tls_context_factory
    assert c.codes("MAIL FROM:<a@b.example>\r\n") == ["503 5.5.1"]
    out = c.send("EHLO again\r\n").decode()
    assert "STARTTLS" not in out
    assert c.codes("STARTTLS\r\n") == ["503 5.5.1"]
    assert c.proto.session.protocol_name == "ESMTPS"


def test_starttls_with_arguments_or_unavailable():
    c = Client(tls=True)
    c.ready()
    assert c.codes("STARTTLS now\r\n") == ["501 5.5.4"]
    plain = Client()
    plain.ready()
    assert plain.codes("STARTTLS\r\n") == ["502 5.5.1"]


class FakeAuth:
    """An authenticator over plain-text passwords that answers at once (tests/contract_authenticator.py)."""

    def __init__(self, users: dict[str, str] | None = None, max_failures: int = 3) -> None:
        self.users = {"app": "secret"} if users is None else users
        self.max_failures = max_failures
        self.failures: dict[str, int] = {}

    def check(self, user, password):
        return defer.succeed(user in self.users and self.users[user] == password)

    def failed(self, client):
        self.failures[client] = self.failures.get(client, 0) + 1
        return self.failures[client] >= self.max_failures

    def succeeded(self, client):
        self.failures.pop(client, None)


def test_auth_is_refused_before_tls_and_works_after():
    c = Client(tls=True, authenticator=FakeAuth())
    c.ready()
    assert c.codes("AUTH PLAIN " + base64.b64encode(b"\0app\0secret").decode() + "\r\n") == ["538 5.7.11"]
    c.send("STARTTLS\r\n")
    assert "AUTH PLAIN LOGIN" in c.send("EHLO again\r\n").decode()
    assert c.codes("AUTH PLAIN " + base64.b64encode(b"\0app\0wrong").decode() + "\r\n") == ["535 5.7.8"]
    assert c.codes("AUTH PLAIN " + base64.b64encode(b"\0app\0secret").decode() + "\r\n") == ["235 2.7.0"]
    assert c.proto.session.auth_user == "app"
    assert c.proto.session.protocol_name == "ESMTPSA"


def test_auth_login_dialogue_and_lockout():
    c = Client(tls=True, authenticator=FakeAuth())
    c.ready()
    c.send("STARTTLS\r\n")
    c.send("EHLO again\r\n")
    assert c.send("AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert c.send(base64.b64encode(b"app") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert c.codes(base64.b64encode(b"nope") + b"\r\n") == ["535 5.7.8"]
    c.send("AUTH LOGIN " + base64.b64encode(b"app").decode() + "\r\n")
    assert c.codes(base64.b64encode(b"nope") + b"\r\n") == ["535 5.7.8"]
    c.send("AUTH LOGIN\r\n")
    c.send(base64.b64encode(b"app") + b"\r\n")
    assert c.codes(base64.b64encode(b"nope") + b"\r\n") == ["535 5.7.8", "421 4.7.0"]
    assert c.closed


def test_auth_garbage_and_cancel():
    c = Client(tls=True, authenticator=FakeAuth())
    c.ready()
    c.send("STARTTLS\r\n")
    c.send("EHLO again\r\n")
    assert c.codes("AUTH PLAIN !!!\r\n") == ["501 5.5.2"]
    c.send("AUTH PLAIN\r\n")
    assert c.codes("*\r\n") == ["501 5.0.0"]
    assert c.codes("AUTH CRAM-MD5\r\n") == ["504 5.5.4"]


# -- the body scanner -----------------------------------------------------------------------------------


def test_body_collector_sees_a_crlf_split_across_chunks_as_fine():
    b = BodyCollector(10_000)
    b.feed(b"abc\r")
    b.feed(b"\ndef\r\n")
    assert b.problem() is None
    assert b.body() == b"abc\r\ndef\r\n"


def test_body_collector_long_line_split_across_chunks():
    b = BodyCollector(10_000)
    b.feed(b"x" * 600)
    b.feed(b"x" * 399 + b"\r\n")
    assert b.problem() is not None
    assert b.problem().enhanced == "5.6.0"


def test_disconnect_is_reported_to_the_delegate():
    c = Client()
    c.proto.connectionLost(None)
    assert c.delegate.calls[-1] == ("disconnected",)


def _reference_problem(data: bytes) -> str | None:
    """The content rules written the slow, obvious way: line by line."""
    if data.replace(b"\r\n", b"").count(b"\r") or data.replace(b"\r\n", b"").count(b"\n"):
        return "bare"
    if b"\0" in data:
        return "nul"
    if any(len(line) >= 999 for line in data.split(b"\r\n")[:-1]) or len(data.rpartition(b"\r\n")[2]) >= 1000:
        return "long"
    return None


def test_body_collector_agrees_with_a_line_by_line_reading_however_the_content_is_cut():
    import random

    rng = random.Random(9)
    pieces = [b"a" * n for n in (1, 70, 997, 998, 999, 1000, 1500)] + [b"\r\n", b"\r", b"\n", b"\0", b"\n\r", b"."]
    for _ in range(400):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) + b"\r\n"
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 5))))
        b = BodyCollector(1_000_000)
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            b.feed(data[start:end])
        problem = b.problem()
        expected = _reference_problem(data)
        assert (problem is None) == (expected is None), (data, cuts, problem, expected)
        if expected == "bare":
            assert "bare CR or bare LF" in problem.text
        elif expected == "long" and b"\0" not in data:
            assert "longer than 1000" in problem.text


def test_encode_data_sends_clean_content_as_it_is_and_normalises_the_rest():
    import random

    rng = random.Random(3)
    for _ in range(300):
        body = b"".join(rng.choice([b"ab", b".", b"\r\n", b"\r", b"\n", b"\n.", b"\r\n."]) for _ in range(rng.randint(0, 10)))
        lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        expected = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"
        assert encode_data(body) == expected, body


def test_only_crlf_agrees_with_a_reading_octet_by_octet_over_any_slice():
    import random

    from pymta.smtp.content import only_crlf

    def every_cr_lf_in_a_crlf(data: bytes) -> bool:
        i = 0
        while i < len(data):
            if data[i : i + 2] == b"\r\n":
                i += 2
            elif data[i : i + 1] in (b"\r", b"\n"):
                return False
            else:
                i += 1
        return True

    rng = random.Random(11)
    answers = set()
    for _ in range(5000):
        data = bytes(rng.choice(b"a.\r\n\0") for _ in range(rng.randint(0, 40)))
        start = rng.randint(0, len(data))
        end = rng.randint(start, len(data))
        expected = every_cr_lf_in_a_crlf(data[start:end])
        assert only_crlf(data, start, end) == expected, (data, start, end)
        assert only_crlf(data[start:end]) == expected
        answers.add(expected)
    assert answers == {True, False}
    assert not only_crlf(b"a\rb\nc")  # a CR and an LF, each bare, with text between them
