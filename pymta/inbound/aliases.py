"""Aliases and virtual maps: the classic aliases file, the ``[virtual]`` table, and their expansion.

The aliases file is the one sendmail and Postfix read (``name: target, target``; a line starting
with white space continues the previous one; ``#`` comments; ``:include:FILE`` reads targets from a
file; ``\\name`` is a mailbox never expanded further). Pipes and files as targets are refused:
pymta delivers into Maildirs and to other hosts only. A malformed file is one line,
``FILE:LINE: NAME: REASON``.

Expansion is recursive and bounded: an address met again on its own path is a loop (that branch
fails ``5.4.6``), except an alias naming itself, which means its own mailbox (``alice: alice, bob``);
nesting past ``max_depth`` fails ``5.4.6`` too, and more than ``max_expansion`` addresses refuse
the recipient.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from pymta.smtp.replies import Reply

log = Logger(namespace="pymta.inbound")

MAX_FILE_OCTETS = 16 * 1024 * 1024
LOOP = Reply(550, "5.4.6", "Alias expansion loop")
TOO_DEEP = Reply(550, "5.4.6", "Alias nesting too deep")
TOO_MANY = Reply(550, "5.5.3", "Alias expands to too many addresses")


class TableError(Exception):
    """A malformed aliases file: ``FILE:LINE: NAME: REASON``."""


def _split_targets(text: str) -> list[str]:
    """Comma-separated targets; commas inside double quotes do not split."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(c)
    out.append("".join(current).strip())
    return [t for t in out if t]


def _read_lines(path: str, where: str) -> list[tuple[int, str]]:
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_OCTETS:
            raise TableError(f"{path}:0: file over {MAX_FILE_OCTETS} octets")
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise TableError(f"{path}:0: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise TableError(f"{where}: cannot read {path}: {e.strerror}") from None
    return list(enumerate(text.splitlines(), 1))


def _check_target(target: str, path: str, number: int, name: str) -> str:
    if target.startswith("|") or target.startswith('"|'):
        raise TableError(f"{path}:{number}: {name}: pipes to commands are not supported ({target})")
    if target.startswith("/"):
        raise TableError(f"{path}:{number}: {name}: delivery into files is not supported ({target})")
    bare = target[1:] if target.startswith("\\") else target
    if target.startswith("<") and target.endswith(">"):
        bare = target[1:-1]
    if not bare or any(c.isspace() or c in "<>()[];" for c in bare.strip('"')) or bare.endswith("@"):
        raise TableError(f"{path}:{number}: {name}: not an address: {target!r}")
    local, at, domain = bare.rpartition("@")
    if at and (not local or not domain or "." not in domain.strip(".")):
        raise TableError(f"{path}:{number}: {name}: not an address: {target!r}")
    return target[1:-1] if target.startswith("<") else target


def parse_aliases(path: str, where: str = "aliases.file") -> dict[str, tuple[str, ...]]:
    """The aliases file as ``{name (lower-cased): (target, ...)}``; :class:`TableError` when malformed."""
    entries: list[tuple[int, str]] = []  # (first line, logical line)
    for number, line in _read_lines(path, where):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not entries:
                raise TableError(f"{path}:{number}: a continuation line with nothing to continue")
            entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())
        else:
            entries.append((number, line.rstrip()))
    out: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    base = os.path.dirname(os.path.abspath(path))
    for number, text in entries:
        name, colon, rest = text.partition(":")
        name = name.strip().strip('"').lower()
        if not colon or not name or any(c.isspace() or c in "@,<>" for c in name):
            raise TableError(f"{path}:{number}: expected \"name: target, target\", got {text[:80]!r}")
        if name in out:
            raise TableError(f"{path}:{number}: {name}: defined twice (first on line {first_line[name]})")
        targets: list[str] = []
        for target in _split_targets(rest):
            if target.lower().startswith(":include:"):
                targets.extend(_include(os.path.join(base, target[9:].strip()), path, number, name))
            else:
                targets.append(_check_target(target, path, number, name))
        if not targets:
            raise TableError(f"{path}:{number}: {name}: no target")
        out[name] = tuple(targets)
        first_line[name] = number
    return out


def _include(path: str, parent: str, number: int, name: str) -> list[str]:
    """Targets of an ``:include:`` file (addresses, comma- or line-separated; no further includes)."""
    out = []
    for inc_number, line in _read_lines(path, f"{parent}:{number}: {name}"):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for target in _split_targets(line):
            if target.lower().startswith(":include:"):
                raise TableError(f"{path}:{inc_number}: {name}: an included file cannot include another")
            out.append(_check_target(target, path, inc_number, name))
    return out


class AliasTables:
    """The aliases file and the ``[virtual]`` table, replaced together by :meth:`reload` (SIGHUP)."""

    def __init__(
        self,
        aliases_path: str | None,
        virtual: dict[str, tuple[str, ...]] | None = None,
        load_virtual: Callable[[], dict[str, tuple[str, ...]]] | None = None,
    ) -> None:
        self.aliases_path = aliases_path
        self.load_virtual = load_virtual
        self.aliases = parse_aliases(aliases_path) if aliases_path else {}
        self.virtual = dict(virtual or {})
        self.virtual_domains = _domains_of(self.virtual)

    def reload(self) -> bool:
        """Read both tables again; on any error the old ones stay and the error is logged."""
        try:
            aliases = parse_aliases(self.aliases_path) if self.aliases_path else {}
            virtual = self.load_virtual() if self.load_virtual is not None else self.virtual
        except Exception as e:  # TableError, ConfigError: one line naming file and line
            log.error("alias tables not reloaded: {why}", why=str(e), event="tables_reload_failed")
            return False
        self.aliases, self.virtual, self.virtual_domains = aliases, dict(virtual), _domains_of(virtual)
        log.info("alias tables reloaded: {aliases} aliases, {virtual} virtual entries", aliases=len(aliases),
                 virtual=len(virtual), event="tables_reloaded")  # fmt: skip
        return True


def _domains_of(virtual: dict[str, tuple[str, ...]]) -> frozenset[str]:
    """Domains named in ``[virtual]`` keys (``user@domain``, ``@domain``): virtual alias domains."""
    return frozenset(key.rpartition("@")[2] for key in virtual if key.rpartition("@")[2])


@dataclass(frozen=True, slots=True)
class Expansion:
    """Final addresses (with ``True`` when reached through an alias) and failed branches."""

    finals: tuple[tuple[str, bool], ...]
    failures: tuple[tuple[str, Reply], ...]
    refused: Reply | None = None  # the whole recipient is refused (too many addresses)


def expand(
    address: str,
    lookup: Callable[[str], tuple[str, ...] | None],
    max_depth: int = 20,
    max_expansion: int = 1000,
) -> Expansion:
    """Expand ``address`` through ``lookup`` (address -> qualified targets, or None for a final one).

    A target written ``\\name`` (or the alias itself) is final. Depth-first, in the tables' order;
    duplicates are kept once.
    """
    finals: dict[str, tuple[str, bool]] = {}
    failures: list[tuple[str, Reply]] = []
    # (address, its ancestors, no further expansion)
    stack: list[tuple[str, tuple[str, ...], bool]] = [(address, (), False)]
    steps = 0
    while stack:
        steps += 1
        if steps > max_expansion * 4 or len(finals) > max_expansion:
            return Expansion((), (), TOO_MANY)
        current, chain, literal = stack.pop()
        key = current.lower()
        targets = None if literal else lookup(current)
        if targets is None:
            finals.setdefault(key, (current, bool(chain)))
            continue
        if len(chain) >= max_depth:
            failures.append((current, TOO_DEEP))
            continue
        path = (*chain, key)
        pushed = []
        for target in targets:
            literal_target = target.startswith("\\")
            target = target.lstrip("\\")
            if target.lower() == key:
                pushed.append((target, path, True))  # "alice: alice, bob": alice's own mailbox too
            elif target.lower() in path:
                failures.append((target, LOOP))
            else:
                pushed.append((target, path, literal_target))
        stack.extend(reversed(pushed))
    return Expansion(tuple(finals.values()), tuple(failures))
