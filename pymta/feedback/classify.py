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
        try:
            texts.append((re.compile(rule["pattern"], re.IGNORECASE), rule["reason"]))
        except re.error as e:
            raise ValueError(f"{path}: text rule {i + 1} ({rule.get('reason')}): {e}") from None
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
    text = text or ""
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
