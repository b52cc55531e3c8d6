"""API tokens: the tokens file and ``pymta-token``.

One token a line, ``NAME:SCOPES:SHA256HEX`` (SCOPES comma-separated from ``inject``, ``admin``,
``read``; ``admin`` includes ``read``); ``#`` starts a comment. Only the hash is stored: the token
itself (256 random bits) is shown once, by ``pymta-token NAME``. High-entropy tokens need no slow
hash, so a check costs one SHA-256, compared in constant time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass

SCOPES = ("inject", "admin", "read")
_IMPLIED = {"admin": {"read"}}


class TokensFileError(Exception):
    """The tokens file cannot be used; the text names the file and line."""


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: str

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or any(scope in _IMPLIED.get(s, ()) for s in self.scopes)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def parse_tokens(text: str, path: str = "<tokens>") -> list[Token]:
    tokens = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise TokensFileError(f"{path}: line {number}: expected NAME:SCOPES:SHA256HEX")
        name, scopes, hexdigest = (p.strip() for p in parts)
        chosen = frozenset(s.strip() for s in scopes.split(",") if s.strip())
        unknown = chosen - set(SCOPES)
        if not name or not chosen or unknown:
            raise TokensFileError(f"{path}: line {number}: scopes must be from {', '.join(SCOPES)}")
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest.lower()):
            raise TokensFileError(f"{path}: line {number}: not a SHA-256 hex digest")
        tokens.append(Token(name, chosen, hexdigest.lower()))
    return tokens


def load_tokens(path: str) -> list[Token]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_tokens(f.read(), path)
    except OSError as e:
        raise TokensFileError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TokensFileError(f"{path}: not UTF-8 text") from None


class TokenChecker:
    """Finds the token a bearer string belongs to (constant-time comparison of digests)."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens

    def check(self, presented: str) -> Token | None:
        wanted = digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.digest, wanted):
                found = token
        return found


def token_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pymta-token",
        description="Make a new API token: prints the token (keep it) and the line for the tokens file.",
    )
    parser.add_argument("name")
    parser.add_argument("--scopes", default="inject,read", help=f"comma-separated from {', '.join(SCOPES)}")
    args = parser.parse_args(argv)
    scopes = [s for s in args.scopes.split(",") if s]
    if not scopes or set(scopes) - set(SCOPES) or ":" in args.name or not args.name.strip():
        sys.stderr.write(f"pymta-token: the name must not contain ':'; scopes are from {', '.join(SCOPES)}\n")
        return 2
    token = secrets.token_urlsafe(32)
    sys.stdout.write(f"token: {token}\nline:  {args.name}:{','.join(scopes)}:{digest(token)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(token_main())
