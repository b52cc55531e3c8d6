"""Access-control lists per SMTP stage: ordered rules from the config, first match wins.

Stages: connect, helo, mail, rcpt, data (end of data). Matchers (all given must match):
``client`` (CIDRs), ``rdns`` and ``helo`` (exact, ``.suffix`` or ``/regex/``), ``auth`` (true,
false or user names), ``tls`` (true/false), ``sender`` and ``recipient`` (address, ``@domain``
or ``/regex/``; at the data stage ``recipient`` matches any recipient), ``size`` (octets: the
message, or MAIL's SIZE=, is larger), ``spf``, ``dkim``, ``dmarc``, ``arc`` (data stage: the
sender verdicts, e.g. ``["fail", "permerror"]``; mail without verdicts never matches). Actions:
``accept`` (stop this stage's ACL: later rules are skipped; relay control still applies),
``reject`` (5xx), ``tempfail`` (4xx), ``continue``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.config import AclRule
from pymta.inbound.policy import in_networks
from pymta.interfaces import IPolicy
from pymta.log import debug
from pymta.smtp.replies import Reply

log = Logger(namespace="pymta.inbound.acl")

DEFAULT_REJECT = Reply(550, "5.7.1", "Access denied")
DEFAULT_TEMPFAIL = Reply(450, "4.7.1", "Try again later")


class _Text:
    """One string matcher: exact (case-insensitive), ``.suffix``, or ``/regex/``."""

    __slots__ = ("exact", "regex", "suffix")

    def __init__(self, pattern: str) -> None:
        self.regex = self.suffix = self.exact = None
        if len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
            self.regex = re.compile(pattern[1:-1], re.IGNORECASE)
        elif pattern.startswith("."):
            self.suffix = pattern.lower()
        else:
            self.exact = pattern.lower()

    def match(self, value: str) -> bool:
        if self.regex is not None:
            return self.regex.search(value) is not None
        value = value.lower()
        if self.suffix is not None:
            return value.endswith(self.suffix)
        return value == self.exact


class _Address(_Text):
    """An address matcher: ``user@domain``, ``@domain``, or ``/regex/``; ``<>`` is the null sender."""

    def match(self, value: str) -> bool:
        if self.regex is None and self.exact is not None and self.exact.startswith("@"):
            return value.lower().rpartition("@")[2] == self.exact[1:]
        if self.exact == "<>":
            return value == ""
        return super().match(value)


def _any(matchers: Iterable[_Text], value: str) -> bool:
    return any(m.match(value) for m in matchers)


class CompiledRule:
    def __init__(self, rule: AclRule) -> None:
        self.rule = rule
        self.client = rule.client
        self.rdns = [_Text(p) for p in rule.rdns] if rule.rdns is not None else None
        self.helo = [_Text(p) for p in rule.helo] if rule.helo is not None else None
        self.sender = [_Address(p) for p in rule.sender] if rule.sender is not None else None
        self.recipient = [_Address(p) for p in rule.recipient] if rule.recipient is not None else None
        if rule.action == "reject":
            self.reply: Reply | None = Reply(*rule.reply) if rule.reply else DEFAULT_REJECT
        elif rule.action == "tempfail":
            self.reply = Reply(*rule.reply) if rule.reply else DEFAULT_TEMPFAIL
        else:
            self.reply = None

    def matches(self, session: Any, details: dict[str, Any]) -> bool:
        r = self.rule
        if self.client is not None and not in_networks(session.peer_address, self.client):
            return False
        if self.rdns is not None and not _any(self.rdns, session.notes.get("client_name") or "unknown"):
            return False
        if self.helo is not None and not _any(self.helo, session.helo_name or ""):
            return False
        if r.auth is not None:
            if isinstance(r.auth, bool):
                if bool(session.auth_user) != r.auth:
                    return False
            elif session.auth_user not in r.auth:
                return False
        if r.tls is not None and bool(session.tls) != r.tls:
            return False
        if self.sender is not None:
            sender = details.get("sender")
            if sender is None and session.transaction is not None:
                sender = session.transaction.sender
            if sender is None or not _any(self.sender, sender):
                return False
        if self.recipient is not None:
            rcpts = details.get("recipients") or ([details["recipient"]] if details.get("recipient") else [])
            if not any(_any(self.recipient, a) for a in rcpts):
                return False
        if r.size is not None:
            size = details.get("size")
            if size is None or size <= r.size:
                return False
        if r.spf is not None or r.dkim is not None or r.dmarc is not None or r.arc is not None:
            verdicts = session.transaction.notes.get("auth") if session.transaction is not None else None
            for method in ("spf", "dkim", "dmarc", "arc"):
                wanted = getattr(r, method)
                if wanted is not None and (verdicts is None or verdicts.value(method) not in wanted):
                    return False
        return True


@implementer(IPolicy)
class AclPolicy:
    """The ``[[acl.<stage>]]`` rules, compiled once."""

    def __init__(self, rules: dict[str, Iterable[AclRule]]) -> None:
        self.stages = {stage: [CompiledRule(r) for r in stage_rules] for stage, stage_rules in rules.items()}

    def __bool__(self) -> bool:
        return any(self.stages.values())

    def check(self, stage: str, session: Any, **details: Any) -> Reply | None:
        for index, rule in enumerate(self.stages.get(stage, ())):
            if not rule.matches(session, details):
                continue
            action = rule.rule.action
            if action == "continue":
                continue
            debug(log, "acl {stage}[{index}] {action} for {client}", stage=stage, index=index + 1, action=action,
                  client=session.peer_address, comment=rule.rule.comment)  # fmt: skip
            return rule.reply  # None for accept: the stage's remaining rules are skipped
        return None
