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
    assert proc.returncode == 0 and proc.stderr == ""
    user, _, stored = proc.stdout.rstrip("\n").partition(":")
    assert user == "app" and "\n" not in stored.strip()
    assert verify_password("pw with spaces", stored)
    bad = subprocess.run([sys.executable, "-m", "pymta.inbound.auth", "a:b"], input="x\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""


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
