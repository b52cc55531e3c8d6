"""Bounce reasons (Sisimai's taxonomy) and hard/soft from status codes and diagnostic text; the
rules are data in ``rules.toml`` beside this module (or a file given), compiled once."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from pymta.wordings import pattern_problem

RULES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules.toml")
MAX_TEXT = 4096  # the diagnostic text a rule is matched against is cut to this many characters
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


BEFORE_DATA_DEFAULT = ("CONN", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT")


@dataclass(frozen=True)
class Rules:
    codes: dict[str, str]  # enhanced status code -> reason
    prefixes: dict[str, str]  # "5.7" -> reason, the last resort of a code
    patterns: dict[str, re.Pattern[str]]  # reason -> its wordings
    first: tuple[str, ...]  # reasons tried in order, by code or by wording
    second: tuple[str, ...]  # wordings tried when the first pass found nothing
    retry: frozenset[str]  # reasons a code only hints at
    before_data: frozenset[str]  # SMTP commands answered before the message was sent
    userunknown_unless: tuple[str, ...]  # wordings that override a userunknown code
    userunknown_always: re.Pattern[str] | None  # wordings that are userunknown whatever the command
    hard: frozenset[str]
    permanent_only: frozenset[str]
    undecided: frozenset[str]
    default_soft: str
    default_permanent: str


def load_rules(path: str = RULES_PATH) -> Rules:
    """Read and compile a rules file; ValueError naming the rule when a pattern is bad or unsafe."""
    with open(path, "rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    patterns = {}
    for i, (reason, pattern) in enumerate(data.get("patterns", {}).items()):
        problem = pattern_problem(pattern)
        if problem:
            raise ValueError(f"{path}: pattern {i + 1} ({reason}): {problem}")
        patterns[reason] = re.compile(pattern, re.IGNORECASE)
    order = data.get("order", {})
    context = data.get("context", {})
    hard = data.get("hard", {})
    default = data.get("default", {})
    for name in (*order.get("first", []), *order.get("second", []), *context.get("userunknown_unless", [])):
        if name not in patterns:
            raise ValueError(f"{path}: order: {name}: no pattern of that name")
    always = context.get("userunknown_always")
    if always and pattern_problem(always):
        raise ValueError(f"{path}: context.userunknown_always: {pattern_problem(always)}")
    return Rules(
        dict(data.get("codes", {})), dict(data.get("prefixes", {})), patterns, tuple(order.get("first", [])),
        tuple(order.get("second", [])), frozenset(order.get("retry", [])),
        frozenset(context.get("before_data", BEFORE_DATA_DEFAULT)), tuple(context.get("userunknown_unless", [])),
        re.compile(always, re.IGNORECASE) if always else None, frozenset(hard.get("reasons", [])), frozenset(hard.get("permanent_only", [])),
        frozenset(data.get("undecided", {}).get("reasons", ["undefined", "onhold"])),
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
    return reason in rules.permanent_only and code_class != "4"


def effective_status(status: str | None, text: str) -> str | None:
    """The status that decides: the Diagnostic-Code's own enhanced code when it is more specific
    than ``status`` (Status 5.1.1 with "552 5.2.2 over quota" is a full mailbox)."""
    found = find_status(text)
    if found and (not status or status[2:] in ("0.0", "") or (not found.endswith(".0.0") and found[0] == status[0])):
        return found
    return status


def classify(
    status: str | None,
    text: str,
    code: int | None = None,
    rules: Rules | None = None,
    command: str | None = None,
    action: str | None = None,
) -> tuple[str, bool]:
    """(reason, hard) for a failure with enhanced ``status``, diagnostic ``text``, basic reply
    ``code`` and the SMTP ``command`` it answered (RCPT, DATA, MAIL, HELO, CONN or None)."""
    rules = rules or default_rules()
    text = " ".join((text or "")[:MAX_TEXT].replace("\u2019", "'").split())
    status = effective_status(status, text)
    code_class = status[0] if status else (str(code)[0] if code else None)
    reason = _reason(rules, status, text, command, action, code)
    return reason, is_hard(reason, code_class, rules)


def _reason(rules: Rules, status: str | None, text: str, command: str | None, action: str | None,
            code: int | None) -> str:  # fmt: skip
    by_code = rules.codes.get(status or "", "")
    if by_code == "delivered" or (status or "").startswith("2."):
        return "delivered"
    seen: dict[str, bool] = {}
    vetoed = False  # the text showed the code's own reason to be wrong

    def says(name: str) -> bool:
        if name not in seen:
            seen[name] = bool(rules.patterns[name].search(text))
        return seen[name]

    for name in rules.first:
        if name == "userunknown":
            if by_code == name:
                if not any(says(other) for other in rules.userunknown_unless):
                    return name
                vetoed = True
            if rules.userunknown_always is not None and rules.userunknown_always.search(text):
                return name
            if says(name) and (command == "RCPT" or (command is None and status and not by_code and not says("filtered"))):
                return name
        elif name == "filtered":
            if by_code == name and (says("userunknown") or says(name)):
                return name
            # "user unknown" is a content filter's answer unless it came at RCPT, or a DSN says nothing more
            if by_code != "suspend" and (
                says(name) or (command not in rules.before_data and says("userunknown") and (command or not status or by_code))
            ):
                return name
        elif name == "rejected":
            if by_code == name:
                return name
            if command == "MAIL" and says(name):
                return name
            if command == "DATA" and by_code != "userunknown" and says(name):
                return name
            if command not in ("MAIL", "DATA") and by_code in ("", "undefined", "onhold", "securityerror",
                                                              "systemerror") and says(name):  # fmt: skip
                return name
        elif name == "hostunknown":
            # a DNS failure that says "try again" is a network error, no MX is notaccept: not a dead domain
            if says("networkerror") or says("notaccept"):
                vetoed = vetoed or by_code == name
            elif by_code == name or says(name):
                return name
        elif by_code == name or says(name):
            return name
    if by_code and by_code not in rules.retry and not vetoed:
        return by_code
    for name in rules.second:
        if says(name):
            return name
    if by_code and not vetoed:
        return by_code
    if status and status[:3] in rules.prefixes:
        return rules.prefixes[status[:3]]
    if command == "MAIL":  # refused at MAIL FROM with nothing more specific: the sender was rejected
        return "rejected"
    if code and code % 100 <= 7 and code // 10 % 10 == 0:  # 500-507, 400-407: the command itself was refused
        return "syntaxerror"
    if action == "delayed":
        return "expired"
    if command in ("CONN", "HELO"):
        return "blocked"
    if text:  # something was said that nobody has a rule for
        return "onhold"
    return rules.default_soft if (status or str(code or ""))[:1] == "4" else rules.default_permanent


def is_undecided(reason: str | None, rules: Rules | None = None) -> bool:
    """A reason that says nothing about the recipient (it suppresses nobody)."""
    return not reason or reason in (rules or default_rules()).undecided


def bounce_verdict(reason: str | None, hard: bool | None, status: str | None, code: int | None = None,
                   rules: Rules | None = None) -> str | None:  # fmt: skip
    """How a failure counts toward suppression: "hard" (suppress for good) only for a hard reason
    with a permanent 5.x.x status (or, lacking one, a 5xx reply); "soft" (counts toward the
    soft-bounce threshold) otherwise; None for an undecided reason, which suppresses nobody."""
    if is_undecided(reason, rules):
        return None
    permanent = status[:2] == "5." if status else (code is not None and 500 <= code < 600)
    return "hard" if hard and permanent else "soft"
