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
    return read_users_file(path)[0]


def read_users_file(path: str) -> tuple[dict[str, str], dict[str, frozenset[str]]]:
    """``user:hash[:sender,sender...]`` per line -> (user -> hash, user -> owned senders).

    A sender is an address or ``@domain`` (every address of the domain); blank lines and
    ``#`` comments are ignored.
    """
    users: dict[str, str] = {}
    owned: dict[str, frozenset[str]] = {}
    for number, line in _lines(path, "users file"):
        user, sep, rest = line.partition(":")
        stored, _, senders = rest.partition(":")
        if not sep or not user or not stored.startswith(SCHEME):
            raise UsersFileError(f"{path}: line {number}: expected user:$scrypt$... (made by pymta-passwd)")
        users[user] = stored
        owned[user] = _senders(senders.split(","), path, number)
    return users, owned


def read_sender_login_map(path: str) -> dict[str, frozenset[str]]:
    """Postfix ``smtpd_sender_login_maps`` form: ``sender  user[, user...]`` per line, the
    sender an address or ``@domain`` -> user -> owned senders."""
    owned: dict[str, set[str]] = {}
    for number, line in _lines(path, "sender login map"):
        fields = line.split(None, 1)
        users = [u.strip() for u in fields[1].split(",") if u.strip()] if len(fields) == 2 else []
        if not users:
            raise UsersFileError(f"{path}: line {number}: expected a sender address or @domain, then its user(s)")
        (sender,) = _senders([fields[0]], path, number)
        for user in users:
            owned.setdefault(user, set()).add(sender)
    return {user: frozenset(senders) for user, senders in owned.items()}


def _lines(path: str, what: str) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read {what}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"{path}: cannot read {what}: not UTF-8") from None
    stripped = ((n, line.strip()) for n, line in enumerate(lines, start=1))
    return [(n, line) for n, line in stripped if line and not line.startswith("#")]


def _senders(items: list[str], path: str, number: int) -> frozenset[str]:
    out = set()
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        local, at, domain = item.rpartition("@")
        if not at or not domain or any(c.isspace() for c in item):
            raise UsersFileError(f"{path}: line {number}: {item!r} is neither an address nor @domain")
        out.add(f"{local}@{domain.rstrip('.')}")
    return frozenset(out)


class SenderLogins:
    """Which senders an authenticated user owns (Postfix's ``reject_sender_login_mismatch``):
    the addresses and ``@domain`` entries listed for the user; a login name that is an address also
    owns that address. Comparison ignores case."""

    def __init__(self, owned: dict[str, frozenset[str]]) -> None:
        self.owned = owned

    @classmethod
    def from_files(cls, users_file: str, map_file: str | None = None) -> SenderLogins:
        owned = dict(read_users_file(users_file)[1])
        for user, senders in (read_sender_login_map(map_file) if map_file else {}).items():
            owned[user] = owned.get(user, frozenset()) | senders
        return cls(owned)

    def owns(self, user: str, address: str) -> bool:
        address = address.lower()
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return False
        domain = domain.rstrip(".")
        address = f"{local}@{domain}"
        allowed = self.owned.get(user, frozenset())
        return address == user.lower() or address in allowed or f"@{domain}" in allowed


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

    parser = argparse.ArgumentParser(prog="pymta-passwd", description=(passwd_main.__doc__ or "").split("\n")[0])
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
