"""Value types of a queued message: Envelope, Recipient, delivery results, queue ids; JSON forms.

The envelope is the small file that travels between queue states; the body never changes
after it is queued. Recipient status is per recipient.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field, fields
from typing import Any

# Per-recipient states.
PENDING = "pending"  # not tried yet, or due for another attempt
DEFERRED = "deferred"  # tried, temporary failure; next attempt scheduled
DELIVERED = "delivered"  # accepted by the next hop or the local mailbox
FAILED = "failed"  # permanent failure (a bounce is due or was sent)
EXPIRED = "expired"  # gave up after max_age
RELAYED = "relayed"  # delivered to a hop that does not speak DSN (for NOTIFY=SUCCESS)
FINAL_STATES = frozenset({DELIVERED, FAILED, EXPIRED, RELAYED})

# Where an accepted recipient goes.
ROUTE_LOCAL = "local"  # a Maildir under state_dir/mail
ROUTE_RELAY = "relay"  # outbound SMTP (MX lookup, smarthost, route)
ROUTE_FORWARD = "forward"  # a local (MX) domain forwarded to its configured route
ROUTE_FEEDBACK = "feedback"  # bounce / complaint / reply processor

_QID_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTVWXYZ"  # Crockford base32, sortable
_qid_counter = 0
# The process id and a generator seeded from os.urandom, made again in a forked child: no system
# call per queue id for either.
_qid_pid = os.getpid() & 0xFFFF
_qid_random = random.Random(os.urandom(16))


def _after_fork() -> None:
    global _qid_pid, _qid_random
    _qid_pid, _qid_random = os.getpid() & 0xFFFF, random.Random(os.urandom(16))


os.register_at_fork(after_in_child=_after_fork)


def new_qid(now: float | None = None) -> str:
    """A queue id: sortable by arrival (``now`` in microseconds), unique across processes (pid +
    counter + random).

    Every room of the MTA passes ``now`` from its injected wall clock (the arrival it writes down);
    only a caller with no clock (a test, a command-line tool) leaves it to the system's wall clock.

    Only ``[0-9A-Z]``: safe as a file name and in a Received header.
    """
    global _qid_counter
    _qid_counter = (_qid_counter + 1) & 0xFFFF
    micros = int((time.time() if now is None else now) * 1_000_000)
    value = (micros << 56) | (_qid_pid << 40) | (_qid_counter << 24) | _qid_random.getrandbits(24)
    out = []
    while value:
        value, rem = divmod(value, 32)
        out.append(_QID_ALPHABET[rem])
    return "".join(reversed(out))


def qid_time(qid: str) -> float | None:
    """The arrival time :func:`new_qid` put in ``qid`` (wall seconds), or None for a name it did
    not make (or one whose time is outside 2000-2100)."""
    if not 20 <= len(qid) <= 26:
        return None
    value = 0
    for c in qid:
        digit = _QID_ALPHABET.find(c)
        if digit < 0:
            return None
        value = value * 32 + digit
    seconds = (value >> 56) / 1_000_000
    return seconds if 946_684_800 <= seconds < 4_102_444_800 else None


def is_qid(text: str) -> bool:
    return 16 <= len(text) <= 32 and all(c in _QID_ALPHABET for c in text)


@dataclass(slots=True)
class Recipient:
    """One recipient of a queued message and its delivery state."""

    address: str  # the RCPT TO address as accepted (domain lower-cased, local part as given)
    route: str = ROUTE_RELAY
    orcpt: str | None = None  # DSN ORCPT, "addr-type;xtext-decoded address"
    notify: tuple[str, ...] | None = None  # DSN NOTIFY: None = default (FAILURE,DELAY), ("NEVER",) ...
    state: str = PENDING
    attempts: int = 0
    reply: dict[str, Any] | None = None  # last reply {"code", "enhanced", "text"}
    remote_mta: str | None = None  # the host that gave the last reply
    updated: float = 0.0  # time of the last state change
    dsn_sent: bool = False  # the final DSN for this recipient was generated (or not needed)
    sender: str | None = None  # envelope sender for this recipient only (SRS for forwarded mail); None = the message's

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(slots=True)
class Envelope:
    """The envelope of one queued message (the body lives in its own file)."""

    qid: str
    sender: str  # "" for the null reverse path
    recipients: list[Recipient]
    arrival: float = 0.0
    size: int = 0  # body octets as queued
    body_type: str = "7BIT"  # 7BIT, 8BITMIME, BINARYMIME (from MAIL BODY=)
    smtputf8: bool = False
    ret: str | None = None  # DSN RET: FULL or HDRS
    envid: str | None = None  # DSN ENVID (xtext decoded)
    client_address: str = ""
    client_name: str = ""  # reverse DNS of the client, when known
    helo: str = ""
    protocol: str = "ESMTP"  # SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, LOCAL
    auth_user: str | None = None
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    attempts: int = 0  # delivery attempts of the message (any recipient)
    next_attempt: float = 0.0  # when it is due (0 = now)
    not_before: float = 0.0  # scheduled delivery (X-Pymta-Deliver-After)
    delay_warned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # forward-compatible room (pool, tags)

    def pending_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.is_final]

    def is_done(self) -> bool:
        return all(r.is_final for r in self.recipients)

    def to_json(self) -> bytes:
        # Field by field rather than dataclasses.asdict (a deep copy): this runs once per message.
        data = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        data["recipients"] = [
            {name: getattr(r, name) for name in _RECIPIENT_FIELDS} for r in self.recipients
        ]
        return _ENCODER.encode(data).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        """Parse an envelope file; raises ValueError on anything malformed (the caller quarantines)."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("envelope is not a JSON object")
            rcpts = []
            for r in data.pop("recipients"):
                if not r.keys() <= _RECIPIENT_KEYS:  # written by a newer release: drop what we do not know
                    r = {k: v for k, v in r.items() if k in _RECIPIENT_KEYS}
                if r.get("notify") is not None:
                    r["notify"] = tuple(r["notify"])
                rcpts.append(Recipient(**r))
            if not data.keys() <= _ENVELOPE_KEYS:
                data = {k: v for k, v in data.items() if k in _ENVELOPE_KEYS}
            return cls(recipients=rcpts, **data)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"malformed envelope: {e}") from e


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope) if f.name != "recipients")
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))
_ENVELOPE_KEYS = frozenset(_ENVELOPE_FIELDS)  # "recipients" is popped before the check
_RECIPIENT_KEYS = frozenset(_RECIPIENT_FIELDS)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What happened to one recipient in one delivery attempt."""

    address: str
    status: str  # DELIVERED, DEFERRED, FAILED, RELAYED
    code: int
    enhanced: str
    text: str
    remote_mta: str | None = None  # "mx.example.org [192.0.2.1]"
    tls: str | None = None  # "TLSv1.3 cipher" when the session was encrypted
    extra: dict[str, Any] = field(default_factory=dict)

    def reply_dict(self) -> dict[str, Any]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}
