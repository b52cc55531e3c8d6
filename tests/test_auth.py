"""Submission credentials: scrypt hashes, the users file, pymta-passwd, failure counting."""

from __future__ import annotations

import subprocess
import sys

import pytest
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from pymta.inbound.auth import Authenticator, UsersFileError, hash_password, load_users, verify_password


def test_hash_verifies_only_the_right_password_and_is_salted():
    stored = hash_password("s3cret pass", n=2**10)
    assert stored.startswith("$scrypt$n=1024,r=8,p=1$")
    assert verify_password("s3cret pass", stored)
    assert not verify_password("s3cret pasS", stored)
    assert hash_password("s3cret pass", n=2**10) != stored


@pytest.mark.parametrize("stored", ["", "plain", "$scrypt$n=x$a$b", "$scrypt$n=1024,r=8,p=1$!!$!!", "$md5$abc"])
def test_malformed_hashes_never_verify(stored):
    assert not verify_password("anything", stored)


def test_users_file_errors_name_the_line(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# comment\n\napp:{hash_password('x', n=2**10)}\nbroken line\n")
    with pytest.raises(UsersFileError, match="line 4"):
        load_users(str(path))
    path.write_text(f"app:{hash_password('x', n=2**10)}\n")
    assert list(load_users(str(path))) == ["app"]
    with pytest.raises(UsersFileError, match="cannot read"):
        load_users(str(tmp_path / "missing"))


def test_pymta_passwd_reads_stdin_without_prompt_and_prints_only_the_line():
    proc = subprocess.run(
        [sys.executable, "-m", "pymta.inbound.auth", "app"], input="pw with spaces\n",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    assert proc.stderr == ""
    user, _, stored = proc.stdout.rstrip("\n").partition(":")
    assert user == "app"
    assert "\n" not in stored.strip()
    assert verify_password("pw with spaces", stored)
    bad = subprocess.run([sys.executable, "-m", "pymta.inbound.auth", "a:b"], input="x\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stdout == ""


class AuthenticatorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(1, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.auth = Authenticator({"app": hash_password("right", n=2**10)}, reactor, self.pool, max_failures=3)

    @defer.inlineCallbacks
    def test_right_wrong_and_unknown_users(self):
        assert (yield self.auth.check("app", "right")) is True
        assert (yield self.auth.check("app", "wrong")) is False
        assert (yield self.auth.check("nobody", "right")) is False

    def test_failures_in_a_row_trip_then_success_resets(self):
        assert not self.auth.failed("192.0.2.1")
        assert not self.auth.failed("192.0.2.1")
        assert self.auth.failed("192.0.2.1")
        self.auth.succeeded("192.0.2.1")
        assert not self.auth.failed("192.0.2.1")


def test_users_file_lists_the_senders_each_user_owns(tmp_path):
    from pymta.inbound.auth import SenderLogins, read_users_file

    stored = hash_password("pw", n=2**10)
    path = tmp_path / "users"
    path.write_text(f"alice@example.test:{stored}\napp:{stored}:News@Example.Test, @Shop.Example.\nbob:{stored}\n")
    users, owned = read_users_file(str(path))
    assert set(users) == {"alice@example.test", "app", "bob"}
    assert owned["app"] == frozenset({"news@example.test", "@shop.example"})
    logins = SenderLogins(owned)
    assert logins.owns("app", "NEWS@example.test")
    assert logins.owns("app", "anyone@SHOP.example")
    assert not logins.owns("app", "ceo@example.test")
    assert not logins.owns("app", "x@sub.shop.example")
    assert logins.owns("alice@example.test", "Alice@Example.Test")  # a login that is an address owns it
    assert not logins.owns("bob", "bob@example.test")
    assert not logins.owns("bob", "bob")
    assert not logins.owns("nobody", "news@example.test")


def test_a_sender_login_map_in_postfix_form_adds_owners(tmp_path):
    from pymta.inbound.auth import SenderLogins

    stored = hash_password("pw", n=2**10)
    (tmp_path / "users").write_text(f"app:{stored}:news@example.test\nops:{stored}\n")
    (tmp_path / "map").write_text("# sender  owners\n@example.test  ops\nalerts@example.test app, ops\n")
    logins = SenderLogins.from_files(str(tmp_path / "users"), str(tmp_path / "map"))
    assert logins.owns("app", "news@example.test")
    assert logins.owns("app", "alerts@example.test")
    assert not logins.owns("app", "ceo@example.test")
    assert logins.owns("ops", "ceo@example.test")


@pytest.mark.parametrize(
    ("users", "map_text", "message"),
    [
        ("app:{h}:not an address", None, r"users: line 1: 'not an address' is neither an address nor @domain"),
        ("app:{h}:@", None, r"users: line 1: '@' is neither"),
        ("app:{h}", "alerts@example.test\n", r"map: line 1: expected a sender address or @domain, then its user"),
        ("app:{h}", "\n\nnope app\n", r"map: line 3: 'nope' is neither"),
    ],
)
def test_bad_owner_lists_are_one_line_errors_naming_file_and_line(tmp_path, users, map_text, message):
    from pymta.inbound.auth import SenderLogins, UsersFileError

    (tmp_path / "users").write_text(users.format(h=hash_password("pw", n=2**10)) + "\n")
    if map_text is not None:
        (tmp_path / "map").write_text(map_text)
    with pytest.raises(UsersFileError, match=message):
        SenderLogins.from_files(str(tmp_path / "users"), str(tmp_path / "map") if map_text is not None else None)
