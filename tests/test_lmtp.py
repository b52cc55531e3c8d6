"""LMTP delivery (RFC 2033) against a small scripted LMTP server on loopback (TCP and a UNIX socket):
per-recipient replies after the final dot, connection reuse, timeouts, a server that is down."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from pymta.config import ConfigError, build_config, parse_lmtp_transport
from pymta.envelope import DEFERRED, DELIVERED, FAILED, Envelope, Recipient, new_qid
from pymta.inbound.lmtp import LMTPDeliveryAgent
from tests.mta_process import free_port
from tests.smtp_receiver import ScriptedReceiver


class LMTPServer:
    """Scripted LMTP: ``rcpt`` answers per address at RCPT, ``final`` per address after the dot."""

    def __init__(self) -> None:
        self.rcpt: dict[str, bytes] = {}
        self.final: dict[str, bytes] = {}
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.connections = 0
        self.lhlo: list[str] = []
        self.silent_after_data = False  # never answer after the final dot
        self.drop_after_replies: int | None = None  # close after this many post-dot replies
        server = self

        class Proto(LineReceiver):
            delimiter = b"\r\n"
            MAX_LENGTH = 100000

            def connectionMade(self) -> None:
                server.connections += 1
                self.sender = None
                self.rcpts: list[str] = []
                self.data: list[bytes] | None = None
                self.sendLine(b"220 lmtp.test LMTP ready")

            def lineReceived(self, line: bytes) -> None:
                if self.data is not None:
                    if line == b".":
                        return self.end_of_data()
                    self.data.append(line[1:] if line.startswith(b".") else line)
                    return
                verb = line[:4].upper()
                if verb == b"LHLO":
                    server.lhlo.append(line[5:].decode())
                    self.sendLine(b"250-lmtp.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
                elif verb == b"MAIL":
                    self.sender, self.rcpts = line.decode(), []
                    self.sendLine(b"250 2.1.0 OK")
                elif verb == b"RCPT":
                    address = line.decode().split("<", 1)[1].split(">", 1)[0]
                    answer = server.rcpt.get(address, b"250 2.1.5 OK")
                    if answer.startswith(b"2"):
                        self.rcpts.append(address)
                    self.sendLine(answer)
                elif verb == b"DATA":
                    if not self.rcpts:
                        self.sendLine(b"503 5.5.1 No valid recipients")
                        return
                    self.data = []
                    self.sendLine(b"354 OK")
                elif verb == b"RSET":
                    self.sendLine(b"250 2.0.0 OK")
                elif verb == b"QUIT":
                    self.sendLine(b"221 2.0.0 Bye")
                    self.transport.loseConnection()
                else:
                    self.sendLine(b"500 5.5.2 What?")

            def end_of_data(self) -> None:
                body = b"\r\n".join(self.data or []) + b"\r\n"
                self.data = None
                server.messages.append((self.sender, list(self.rcpts), body))
                if server.silent_after_data:
                    return
                for i, address in enumerate(self.rcpts):
                    if server.drop_after_replies is not None and i >= server.drop_after_replies:
                        self.transport.loseConnection()
                        return
                    self.sendLine(server.final.get(address, b"250 2.0.0 <" + address.encode() + b"> Saved"))

        self.factory = Factory.forProtocol(Proto)


def envelope(*addresses: str) -> Envelope:
    return Envelope(qid=new_qid(), sender="s@remote.test", recipients=[Recipient(a, route="local") for a in addresses])


BODY = b"Subject: hi\r\n\r\n.leading dot\r\nline\r\n"


class LMTPDeliveryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = LMTPServer()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.socket = os.path.join(self.tmp, "lmtp")
        port = reactor.listenUNIX(self.socket, self.server.factory)
        self.addCleanup(port.stopListening)

    def agent(self, transport: str | None = None, **kw) -> LMTPDeliveryAgent:
        agent = LMTPDeliveryAgent(transport or f"lmtp:unix:{self.socket}", "mx.test", reactor, **kw)
        self.addCleanup(agent.close_idle)
        return agent

    @defer.inlineCallbacks
    def test_per_recipient_replies_after_the_dot_give_per_recipient_results(self):
        self.server.final["b@example.test"] = b"452 4.2.2 <b@example.test> Mailbox full"
        self.server.final["c@example.test"] = b"552 5.2.2 <c@example.test> Quota exceeded"
        self.server.rcpt["d@example.test"] = b"550 5.1.1 <d@example.test> User doesn't exist"
        env = envelope("a@example.test", "b@example.test", "c@example.test", "d@example.test")
        results = yield self.agent().deliver(env, env.recipients, BODY)
        by = {r.address: r for r in results}
        self.assertEqual(by["a@example.test"].status, DELIVERED)
        self.assertEqual((by["b@example.test"].status, by["b@example.test"].enhanced), (DEFERRED, "4.2.2"))
        self.assertEqual((by["c@example.test"].status, by["c@example.test"].code), (FAILED, 552))
        self.assertEqual((by["d@example.test"].status, by["d@example.test"].enhanced), (FAILED, "5.1.1"))
        sender, rcpts, body = self.server.messages[0]
        self.assertEqual(sender, "MAIL FROM:<s@remote.test>")
        self.assertEqual(rcpts, ["a@example.test", "b@example.test", "c@example.test"])
        self.assertEqual(body, BODY)  # dot-stuffing undone by the server: the body is intact
        self.assertEqual(self.server.lhlo, ["mx.test"])

    @defer.inlineCallbacks
    def test_one_connection_is_reused_for_consecutive_messages(self):
        agent = self.agent()
        for _ in range(3):
            env = envelope("a@example.test")
            results = yield agent.deliver(env, env.recipients, BODY)
            self.assertEqual(results[0].status, DELIVERED)
        self.assertEqual(len(self.server.messages), 3)
        self.assertEqual(self.server.connections, 1)

    @defer.inlineCallbacks
    def test_tcp_transport(self):
        port = reactor.listenTCP(0, self.server.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        env = envelope("a@example.test")
        results = yield self.agent(f"lmtp:tcp:127.0.0.1:{port.getHost().port}").deliver(env, env.recipients, BODY)
        self.assertEqual(results[0].status, DELIVERED)

    @defer.inlineCallbacks
    def test_server_down_defers_every_recipient(self):
        env = envelope("a@example.test", "b@example.test")
        results = yield self.agent(f"lmtp:tcp:127.0.0.1:{free_port()}").deliver(env, env.recipients, BODY)
        self.assertEqual({(r.status, r.enhanced) for r in results}, {(DEFERRED, "4.4.1")})

    @defer.inlineCallbacks
    def test_silent_server_after_the_dot_times_out_and_defers(self):
        self.server.silent_after_data = True
        env = envelope("a@example.test")
        results = yield self.agent(timeout=1.0).deliver(env, env.recipients, BODY)
        self.assertEqual(results[0].status, DEFERRED)
        self.assertIn("duplicate", results[0].text)

    @defer.inlineCallbacks
    def test_connection_lost_part_way_keeps_the_replies_that_came(self):
        self.server.drop_after_replies = 1
        env = envelope("a@example.test", "b@example.test")
        agent = self.agent()
        results = yield agent.deliver(env, env.recipients, BODY)
        self.assertEqual([r.status for r in results], [DELIVERED, DEFERRED])
        self.server.drop_after_replies = None
        env = envelope("b@example.test")
        results = yield agent.deliver(env, env.recipients, BODY)  # a new connection, not the dead one
        self.assertEqual(results[0].status, DELIVERED)
        self.assertEqual(self.server.connections, 2)


class LMTPConfigTests(unittest.TestCase):
    def test_transports_parse(self):
        self.assertEqual(parse_lmtp_transport("lmtp:unix:/run/dovecot/lmtp"), ("unix", "/run/dovecot/lmtp", 0))
        self.assertEqual(parse_lmtp_transport("lmtp:tcp:127.0.0.1:24"), ("tcp", "127.0.0.1", 24))
        self.assertEqual(parse_lmtp_transport("lmtp:tcp:[::1]:24"), ("tcp", "::1", 24))
        self.assertIsNone(parse_lmtp_transport("lmtp:tcp:127.0.0.1"))
        self.assertIsNone(parse_lmtp_transport("lmtp:unix:relative"))

    def test_default_is_maildir_and_a_bad_transport_is_one_line(self):
        self.assertEqual(build_config({}, "p.toml").mailbox.transport, "maildir")
        with self.assertRaises(ConfigError) as e:
            build_config({"mailbox": {"transport": "lmtp:tcp:host"}}, "p.toml")
        self.assertTrue(str(e.exception).startswith("p.toml: mailbox.transport: expected"))


DOVECOT = "/usr/sbin/dovecot"
DOVECOT_CONF = """protocols = lmtp
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
listen = 127.0.0.1
default_internal_user = nobody
default_login_user = nobody
default_internal_group = nogroup
mail_location = maildir:{d}/mail/%d/%n
first_valid_uid = 0
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


class DovecotTests(unittest.TestCase):
    """A real Dovecot LMTP server (Debian's dovecot-lmtpd) on a UNIX socket in a temporary directory."""

    def setUp(self) -> None:
        if not os.path.exists(DOVECOT) or os.geteuid() != 0:
            raise unittest.SkipTest("needs Debian's dovecot-lmtpd and root (Dovecot drops to the mail user)")
        import pwd
        import subprocess

        self.dir = tempfile.mkdtemp(prefix="pymta-dovecot-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.chmod(self.dir, 0o755)
        nobody = pwd.getpwnam("nobody")
        for sub in ("run", "state", "mail"):
            os.mkdir(os.path.join(self.dir, sub))
        os.chown(os.path.join(self.dir, "mail"), nobody.pw_uid, nobody.pw_gid)
        with open(os.path.join(self.dir, "users"), "w") as f:
            for user in ("alice@example.test", "bob@example.test"):
                f.write(f"{user}::{nobody.pw_uid}:{nobody.pw_gid}::{self.dir}/mail/{user}::\n")
        conf = os.path.join(self.dir, "dovecot.conf")
        with open(conf, "w") as f:
            f.write(DOVECOT_CONF.format(d=self.dir))
        subprocess.run([DOVECOT, "-c", conf], check=True, timeout=30)
        self.addCleanup(subprocess.run, [DOVECOT, "-c", conf, "stop"], timeout=30)
        self.socket = os.path.join(self.dir, "run", "lmtp")

    @defer.inlineCallbacks
    def test_dovecot_delivers_known_users_and_refuses_an_unknown_one(self):
        agent = LMTPDeliveryAgent(f"lmtp:unix:{self.socket}", "mx.test", reactor, timeout=30)
        self.addCleanup(agent.close_idle)
        env = envelope("alice@example.test", "carol@example.test", "bob@example.test")
        results = yield agent.deliver(env, env.recipients, BODY)
        by = {r.address: r for r in results}
        self.assertEqual(by["alice@example.test"].status, DELIVERED)
        self.assertEqual(by["bob@example.test"].status, DELIVERED)
        self.assertEqual((by["carol@example.test"].status, by["carol@example.test"].enhanced), (FAILED, "5.1.1"))
        for user in ("alice", "bob"):
            new = os.path.join(self.dir, "mail", "example.test", user, "new")
            names = os.listdir(new)
            self.assertEqual(len(names), 1)
            with open(os.path.join(new, names[0]), "rb") as f:
                self.assertIn(b"\n.leading dot\n", f.read())


class ThreadedLMTP(ScriptedReceiver):
    """A blocking LMTP server in a thread (for the twistd end-to-end test): b@ gets 452 after the dot."""

    name = b"lmtp"
    ehlo_keywords = (b"PIPELINING",)

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        super().__init__()

    def on_message(self, conn: socket.socket, recipients: list[str], message: bytes, peer: str) -> bytes:
        with self.lock:
            self.messages.append(message)
        return b"\r\n".join(b"452 4.2.2 Mailbox full" if r.startswith("bob@") else b"250 2.0.0 Saved"
                             for r in recipients)  # fmt: skip

    def close(self) -> None:
        self.stop()


def test_twistd_delivers_local_mail_over_lmtp_and_defers_only_the_refused_recipient(tmp_path):
    import smtplib

    from tests.mta_process import MTAProcess

    lmtp = ThreadedLMTP()
    mta = MTAProcess(str(tmp_path), extra_config=f"""
        [mailbox]
        transport = "lmtp:tcp:127.0.0.1:{lmtp.port}"
        """)  # fmt: skip
    mta.start()
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            refused = client.sendmail("s@remote.test", ["alice@example.test", "bob@example.test"],
                                      b"Subject: over lmtp\r\n\r\nhello\r\n")  # fmt: skip
            assert refused == {}
        mta.wait_for(lambda: lmtp.messages, what="the LMTP delivery")
        assert b"Subject: over lmtp" in lmtp.messages[0]
        events = mta.wait_for(lambda: [e for e in mta.log_events() if e.get("event") == "lmtp_result"] or None,
                              what="LMTP results")  # fmt: skip
        by = {e["rcpt"]: e["code"] for e in events}
        assert by == {"alice@example.test": 250, "bob@example.test": 452}
        assert mta.maildir_messages("alice@example.test") == []  # not into the built-in Maildirs
    finally:
        mta.stop()
        lmtp.close()
