"""Submission credentials: the users file (``user:hash`` lines, salted scrypt), verification off
the reactor thread, failed-login counting, and the ``pymta-passwd`` command."""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads

SCHEME = "$scrypt$"
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1


class UsersFileError(Exception):
    """The users file cannot be used; the text names the file, the line and the reason."""


def hash_password(password: str, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"{SCHEME}n={n},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a stored ``$scrypt$`` hash (False if malformed)."""
    if not stored.startswith(SCHEME):
        return False
    try:
        params, salt_b64, digest_b64 = stored[len(SCHEME) :].split("$")
        values = dict(item.split("=", 1) for item in params.split(","))
        n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        if n > 2**20 or r > 32 or p > 16:
            return False
        got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    except (ValueError, KeyError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def load_users(path: str) -> dict[str, str]:
    """``user:hash`` per line; blank lines and ``#`` comments ignored."""
    users: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read users file: {e.strerror}") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith(SCHEME):
            raise UsersFileError(f"{path}: line {number}: expected user:$scrypt$... (made by pymta-passwd)")
        users[user] = stored
    return users


class Authenticator:
    """Checks credentials from a users file; counts failures per client to slow down guessing."""

    def __init__(
        self,
        users: dict[str, str],
        reactor: Any,
        threadpool: Any,
        max_failures: int = 3,
        verify: Callable[[str, str], bool] = verify_password,
    ) -> None:
        self.users = users
        self.reactor = reactor
        self.threadpool = threadpool
        self.max_failures = max_failures
        self.verify = verify
        self.failures: dict[str, int] = {}
        self._dummy = hash_password("not-a-password", n=2**10)

    def check(self, user: str, password: str) -> defer.Deferred[bool]:
        """Deferred True/False; the slow hash runs in a thread, also for unknown users (no timing oracle)."""
        stored = self.users.get(user, self._dummy)
        d = threads.deferToThreadPool(self.reactor, self.threadpool, self.verify, password, stored)
        return d.addCallback(lambda ok: ok and user in self.users)

    def failed(self, client: str) -> bool:
        """Record a failure; True when the client has now failed too often in a row (disconnect it)."""
        count = self.failures.get(client, 0) + 1
        self.failures[client] = count
        if len(self.failures) > 100_000:
            self.failures.clear()
        return count >= self.max_failures

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


def passwd_main(argv: list[str] | None = None) -> int:
    """``pymta-passwd USER``: read a password on stdin (no prompt when it is not a terminal) and
    print the line to add to the users file."""
    import argparse

    parser = argparse.ArgumentParser(prog="pymta-passwd", description=passwd_main.__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="accepted for symmetry with other pymta-* commands")
    parser.add_argument("user")
    args = parser.parse_args(argv)
    if ":" in args.user or not args.user.strip() or any(c.isspace() for c in args.user):
        sys.stderr.write("pymta-passwd: a user name cannot contain ':' or white space\n")
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("pymta-passwd: the passwords differ\n")
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        sys.stderr.write("pymta-passwd: empty password\n")
        return 1
    sys.stdout.write(f"{args.user}:{hash_password(password)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(passwd_main())
