"""Wordings pymta recognises in replies and returned mail, as data (``wordings.toml`` beside this
module): loaded once, each pattern checked to run in linear time before it is compiled."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

WORDINGS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wordings.toml")
MAX_TEXT = 4096  # the text a wording is matched against is cut to this many characters
MAX_REPEAT = 200  # the largest {m,n} a pattern may use
try:  # the regular-expression parser, to check rules before they are compiled
    import re._constants as _sre_constants
    import re._parser as _sre_parser
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre_constants
    import sre_parse as _sre_parser

_POSSESSIVE_REPEAT = getattr(_sre_constants, "POSSESSIVE_REPEAT", _sre_constants.MAX_REPEAT)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` could take more than linear time, or None. A rule may use no unbounded
    quantifier (``*``, ``+``, ``{n,}``) and no nesting of quantifiers whose maxima multiply past
    MAX_REPEAT (``(a{0,9}){0,9}`` is 81): then each start position costs a bounded number of steps."""
    try:
        tree = _sre_parser.parse(pattern)
    except re.error as e:
        return str(e)

    def walk(items: Any, outer: int) -> str | None:
        for op, arg in items:
            if op in (_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT, _POSSESSIVE_REPEAT):
                _low, high, sub = arg
                if high == _sre_constants.MAXREPEAT:
                    return "unbounded quantifier (write {0,N})"
                if high * outer > MAX_REPEAT:
                    return f"quantifiers multiply past {MAX_REPEAT}" if outer > 1 else f"quantifier above {MAX_REPEAT}"
                found = walk(sub, max(1, high) * outer)
            elif op == _sre_constants.SUBPATTERN:
                found = walk(arg[-1], outer)
            elif op == _sre_constants.BRANCH:
                found = next((f for f in (walk(b, outer) for b in arg[1]) if f), None)
            elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
                found = walk(arg[1], outer)
            elif op == _sre_constants.GROUPREF:
                found = "backreference"
            else:
                found = None
            if found:
                return found
        return None

    return walk(tree, 1)


def compile_checked(pattern: str, where: str) -> re.Pattern[str]:
    """``pattern`` compiled case-insensitively; ValueError naming ``where`` when it is bad or unsafe."""
    problem = pattern_problem(pattern)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return re.compile(pattern, re.IGNORECASE)


@dataclass(frozen=True)
class Backoff:
    """Shipped pushback wording: pause the destination, resume at ``share`` of its rate over ``recover``."""

    match: re.Pattern[str]
    pause: float
    share: float
    recover: float


@dataclass(frozen=True)
class Wordings:
    greylisting: re.Pattern[str]
    backoff: tuple[Backoff, ...]
    feedback: dict[str, re.Pattern[str]]


def load_wordings(path: str = WORDINGS_PATH) -> Wordings:
    """Read and check a wordings file; ValueError naming the file and the pattern when one is bad."""
    with open(path, "rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    backoff = tuple(
        Backoff(compile_checked(b["match"], f"{path}: backoff {i + 1}"), float(b["pause"]), float(b["share"]),
                float(b["recover"]))
        for i, b in enumerate(data.get("backoff", []))
    )
    feedback = {name: compile_checked(p, f"{path}: feedback.{name}") for name, p in data.get("feedback", {}).items()}
    return Wordings(compile_checked(data["greylisting"], f"{path}: greylisting"), backoff, feedback)


@functools.cache
def wordings() -> Wordings:
    """The shipped wordings, loaded on first use."""
    return load_wordings()
