"""Local delivery: which mailbox names are safe, and durable delivery into standard Maildirs."""

from __future__ import annotations

import errno
import mailbox
import os
import stat
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pymta.envelope import DEFERRED, DELIVERED, FAILED, Envelope, Recipient, new_qid
from pymta.inbound.mailbox import MaildirDeliveryAgent, mailbox_path
from pymta.interfaces import IDeliveryAgent
from tests.fs_faults import RecordingOps, files_under, started_pool

ROOT = "/srv/mail"

UNSAFE = [
    "../x@example.org",
    "..@example.org",
    ".@example.org",
    ".hidden@example.org",
    "a/b@example.org",
    "a\\b@example.org",
    "a\x00b@example.org",
    "a\x01b@example.org",
    "a\nb@example.org",
    "a\x7fb@example.org",
    "a\u202eb@example.org",  # right-to-left override
    "a\u200bb@example.org",  # zero-width space
    "a\udcffb@example.org",  # undecodable byte smuggled as a surrogate
    "a\u2028b@example.org",  # line separator
    "x" * 65 + "@example.org",
    "\u00e9" * 33 + "@example.org",  # 66 octets in UTF-8
    '"../x"@example.org',
    '"a/b"@example.org',
    '"a\\/b"@example.org',
    '".hidden"@example.org',
    '"a\\"b"@example.org',
    '""@example.org',
    "@example.org",
    "x@",
    "no-at-sign",
    "x@../etc",
    "x@..",
    "x@.example.org",
    "x@example..org",
    "x@a/b.org",
    "x@-a.org",
    "x@[127.0.0.1]",
    "x@exa\x00mple.org",
]

SAFE = [
    ("Bob@Example.ORG", "example.org/bob"),
    ("a.b+tag@example.org", "example.org/a.b+tag"),
    ('"a b"@example.org', "example.org/a b"),
    ('"a\\x01b"@example.org', "example.org/ax01b"),  # a quoted-pair, not a control character
    ("Jos\u00e9@Ex\u00e4mple.org", "ex\u00e4mple.org/jos\u00e9"),
    ("jose\u0301@example.org", "example.org/jos\u00e9"),  # NFC: one mailbox, not two
    ("x" * 64 + "@example.org", "example.org/" + "x" * 64),
    ("user@sub-1.example.org", "sub-1.example.org/user"),
]


@pytest.mark.parametrize("address", UNSAFE)
def test_unsafe_mailbox_names_are_refused(address):
    assert mailbox_path(ROOT, address) is None


@pytest.mark.parametrize(("address", "relative"), SAFE)
def test_safe_addresses_map_to_lower_case_domain_and_local_directories(address, relative):
    assert mailbox_path(ROOT, address) == os.path.join(ROOT, relative)


def test_a_domain_directory_linked_outside_the_root_is_refused(tmp_path):
    root = tmp_path / "mail"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "evil.org").symlink_to(tmp_path / "elsewhere")
    assert mailbox_path(str(root), "x@evil.org") is None
    assert mailbox_path(str(root), "x@good.org") == str(root / "good.org" / "x")


@given(st.text(max_size=80), st.text(max_size=80))
def test_no_address_ever_maps_outside_the_root(local, domain):
    path = mailbox_path(ROOT, f"{local}@{domain}")
    if path is not None:
        assert os.path.dirname(os.path.dirname(os.path.normpath(path))) == ROOT
        assert os.path.commonpath([ROOT, os.path.realpath(path)]) == ROOT


BODY = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


def envelope(*addresses: str, sender: str = "a@example.org") -> Envelope:
    return Envelope(new_qid(), sender, [Recipient(a, route="local") for a in addresses], size=len(BODY))


class MaildirDeliveryTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.pool = started_pool(self)

    def agent(self, ops=None):
        return MaildirDeliveryAgent(self.root, "mx.example.test", reactor, self.pool, ops=ops)

    def deliver(self, agent, env):
        return agent.deliver(env, env.recipients, BODY)

    def test_agent_provides_the_interface(self):
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent()))

    @defer.inlineCallbacks
    def test_each_recipient_gets_a_standard_maildir_message_with_trace_headers(self):
        env = envelope("Bob@example.test", "carol@example.test")
        results = yield self.deliver(self.agent(), env)
        self.assertEqual([(r.address, r.status, r.code, r.enhanced) for r in results], [
            ("Bob@example.test", DELIVERED, 250, "2.0.0"),
            ("carol@example.test", DELIVERED, 250, "2.0.0"),
        ])  # fmt: skip
        for local, address in (("bob", "Bob@example.test"), ("carol", "carol@example.test")):
            box = mailbox.Maildir(os.path.join(self.root, "example.test", local), create=False)
            messages = list(box)
            self.assertEqual(len(messages), 1)
            msg = messages[0]
            self.assertEqual(msg["Delivered-To"], address)
            self.assertEqual(msg["Return-Path"], "<a@example.org>")
            self.assertEqual(msg["Subject"], "hi")
            self.assertEqual(msg.get_payload(), "hello\n")
            self.assertEqual(msg.get_subdir(), "new")

    @defer.inlineCallbacks
    def test_null_sender_gives_an_empty_return_path(self):
        env = envelope("bob@example.test", sender="")
        yield self.deliver(self.agent(), env)
        (msg,) = list(mailbox.Maildir(os.path.join(self.root, "example.test", "bob"), create=False))
        self.assertEqual(msg["Return-Path"], "<>")

    @defer.inlineCallbacks
    def test_line_breaks_in_the_sender_cannot_add_headers(self):
        env = envelope("bob@example.test", sender="a@example.org>\r\nX-Injected: yes\r\n<")
        yield self.deliver(self.agent(), env)
        (msg,) = list(mailbox.Maildir(os.path.join(self.root, "example.test", "bob"), create=False))
        self.assertIsNone(msg["X-Injected"])
        self.assertEqual(msg["Subject"], "hi")

    @defer.inlineCallbacks
    def test_maildir_directories_are_private(self):
        yield self.deliver(self.agent(), envelope("bob@example.test"))
        for sub in ("example.test", "example.test/bob", "example.test/bob/tmp", "example.test/bob/new", "example.test/bob/cur"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.root, sub)).st_mode), 0o700, sub)

    @defer.inlineCallbacks
    def test_messages_delivered_in_a_row_get_distinct_files(self):
        agent = self.agent()
        for _ in range(20):
            yield self.deliver(agent, envelope("bob@example.test"))
        self.assertEqual(len(os.listdir(os.path.join(self.root, "example.test", "bob", "new"))), 20)

    @defer.inlineCallbacks
    def test_delivery_is_fsynced_renamed_into_new_and_new_fsynced_before_the_result(self):
        yield self.deliver(self.agent(), envelope("bob@example.test"))  # creates the Maildir
        ops = RecordingOps(self.root)
        agent = self.agent(ops=ops)
        yield self.deliver(agent, envelope("alice@example.test"))  # the new agent learns its Maildirs exist
        ops.calls.clear()
        results = yield self.deliver(agent, envelope("bob@example.test")).addCallback(
            lambda r: ops.calls.append(("fired",)) or r
        )
        tmp = ops.calls[0][1]
        self.assertTrue(tmp.startswith("example.test/bob/tmp/"))
        self.assertEqual(
            ops.calls,
            [*[(op, tmp) for op in ("open", "write", "fsync", "close", "rename")], ("fsync_dir", "example.test/bob/new"), ("fired",)],
        )
        self.assertEqual(results[0].extra["file"], os.path.join(self.root, "example.test/bob/new", os.path.basename(tmp)))

    @defer.inlineCallbacks
    def test_delivery_runs_off_the_reactor_thread(self):
        threads = []

        class ThreadSpy(RecordingOps):
            def open(self, path, flags, mode=0o600):
                threads.append(threading.current_thread())
                return super().open(path, flags, mode)

        yield self.deliver(self.agent(ThreadSpy(self.root)), envelope("bob@example.test"))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())

    @defer.inlineCallbacks
    def check_failure_defers(self, op, error, code, enhanced):
        def fail(index, name, path):
            return OSError(error, os.strerror(error)) if name == op else None

        env = envelope("bob@example.test", "carol@example.test")
        (bob, carol) = yield self.deliver(self.agent(RecordingOps(self.root, fail)), env)
        for result in (bob, carol):
            self.assertEqual((result.status, result.code, result.enhanced), (DEFERRED, code, enhanced))
        self.assertEqual(files_under(self.root), [])

    def test_full_disk_defers_with_insufficient_storage(self):
        return self.check_failure_defers("write", errno.ENOSPC, 452, "4.3.1")

    def test_quota_exceeded_at_fsync_defers_with_insufficient_storage(self):
        return self.check_failure_defers("fsync", errno.EDQUOT, 452, "4.3.1")

    def test_io_error_at_rename_defers_with_local_error(self):
        return self.check_failure_defers("rename", errno.EIO, 451, "4.3.0")

    @defer.inlineCallbacks
    def test_unsafe_recipient_fails_permanently_and_the_others_are_delivered(self):
        env = envelope("../etc@example.test", "bob@example.test", ".x@example.test")
        results = yield self.deliver(self.agent(), env)
        self.assertEqual([(r.status, r.code, r.enhanced) for r in results], [
            (FAILED, 550, "5.1.1"), (DELIVERED, 250, "2.0.0"), (FAILED, 550, "5.1.1"),
        ])  # fmt: skip
        self.assertEqual(sorted(os.listdir(self.root)), ["example.test"])
        self.assertEqual(os.listdir(os.path.join(self.root, "example.test")), ["bob"])

    @defer.inlineCallbacks
    def test_a_maildir_removed_by_the_operator_is_created_again(self):
        agent = self.agent()
        yield self.deliver(agent, envelope("bob@example.test"))
        for sub in ("new", "cur", "tmp"):
            path = os.path.join(self.root, "example.test", "bob", sub)
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            os.rmdir(path)
        (result,) = yield self.deliver(agent, envelope("bob@example.test"))
        self.assertEqual(result.status, DELIVERED)
        self.assertEqual(len(os.listdir(os.path.join(self.root, "example.test", "bob", "new"))), 1)
