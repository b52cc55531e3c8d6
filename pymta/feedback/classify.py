"""Bounce reasons (Sisimai's taxonomy) and hard/soft from status codes and diagnostic text; the
rules are data in ``rules.toml`` beside this module (or a file given), compiled once."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

RULES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules.toml")
MAX_TEXT = 4096  # the diagnostic text a rule is matched against is cut to this many characters
MAX_REPEAT = 200  # the largest {m,n} a rule may use
try:  # the regular-expression parser, to check rules before they are compiled
    import re._constants as _sre_constants
    import re._parser as _sre_parser
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parser  # type: ignore[no-redef]

_POSSESSIVE_REPEAT = getattr(_sre_constants, "POSSESSIVE_REPEAT", _sre_constants.MAX_REPEAT)
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Rules:
    exact: dict[str, str]
    prefixes: list[tuple[str, str]]
    texts: list[tuple[re.Pattern[str], str]]
    hard: frozenset[str]
    permanent_only: frozenset[str]
    default_soft: str
    default_permanent: str


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
                low, high, sub = arg
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


def load_rules(path: str = RULES_PATH) -> Rules:
    """Read and compile a rules file; ValueError naming the rule when a pattern is bad."""
    with open(path, "rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    exact: dict[str, str] = {}
    prefixes: list[tuple[str, str]] = []
    for rule in data.get("status", []):
        (exact.__setitem__(rule["code"], rule["reason"]) if rule.get("exact") else prefixes.append((rule["code"], rule["reason"])))
    prefixes.sort(key=lambda p: -len(p[0]))
    texts = []
    for i, rule in enumerate(data.get("text", [])):
        problem = pattern_problem(rule["pattern"])
        if problem:
            raise ValueError(f"{path}: text rule {i + 1} ({rule.get('reason')}): {problem}")
        texts.append((re.compile(rule["pattern"], re.IGNORECASE), rule["reason"]))
    hard = data.get("hard", {})
    default = data.get("default", {})
    return Rules(
        exact, prefixes, texts, frozenset(hard.get("reasons", [])), frozenset(hard.get("permanent_only", [])),
        default.get("soft", "undefined"), default.get("permanent", "undefined"),
    )  # fmt: skip


@functools.cache
def default_rules() -> Rules:
    return load_rules()


def find_status(text: str) -> str | None:
    """The first RFC 3463 enhanced status code in ``text``."""
    m = _ENHANCED.search(text or "")
    return ".".join(m.groups()) if m else None


def is_hard(reason: str | None, code_class: str | None, rules: Rules | None = None) -> bool:
    rules = rules or default_rules()
    if reason in rules.hard:
        return True
    return reason in rules.permanent_only and code_class == "5"


def classify(status: str | None, text: str, code: int | None = None, rules: Rules | None = None) -> tuple[str, bool]:
    """(reason, hard) for a failure with enhanced ``status``, diagnostic ``text`` and basic ``code``."""
    rules = rules or default_rules()
    text = (text or "")[:MAX_TEXT]
    status = status or find_status(text)
    code_class = status[0] if status else (str(code)[0] if code else None)
    reason = rules.exact.get(status or "")
    if reason is None:
        for pattern, name in rules.texts:
            if pattern.search(text):
                reason = name
                break
    if reason is None and status:
        for prefix, name in rules.prefixes:
            if status.startswith(prefix):
                reason = name
                break
    if reason is None:
        reason = rules.default_soft if code_class == "4" else rules.default_permanent
    return reason, is_hard(reason, code_class, rules)
