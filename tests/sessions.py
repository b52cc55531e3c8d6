"""Plain stand-ins for the SMTP server's Session and Transaction, for delegate and policy tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import implementer

from pymta.interfaces import ISession


@dataclass
class Accepted:
    address: str
    params: dict = field(default_factory=dict)
    notify: tuple | None = None
    orcpt: str | None = None


@dataclass
class Txn:
    sender: str
    params: dict = field(default_factory=dict)
    body_type: str = "8BITMIME"
    smtputf8: bool = False
    declared_size: int | None = None
    ret: str | None = "HDRS"
    envid: str | None = "env-1"
    recipients: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)


@implementer(ISession)
@dataclass
class Sess:
    peer_address: str = "127.0.0.1"
    peer_port: int = 40000
    helo_name: str | None = "client.example.org"
    esmtp: bool = True
    tls: str | None = None
    auth_user: str | None = None
    transaction: Txn | None = None
    notes: dict = field(default_factory=dict)
    protocol_name: str = "ESMTP"
