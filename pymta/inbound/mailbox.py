"""Local delivery (the MX role): safe mailbox paths and durable writes into standard Maildirs."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
import unicodedata
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pymta.envelope import DEFERRED, DELIVERED, FAILED, DeliveryResult, Envelope, Recipient
from pymta.fsio import DirSyncer, FileOps, discard, is_space_error, write_new_file
from pymta.inbound import quota as maildir_quota
from pymta.interfaces import IDeliveryAgent

log = Logger()

MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 253
# Unicode categories never allowed in a mailbox name: controls, format (bidi, zero-width),
# line/paragraph separators, surrogates, private use, unassigned.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _unquote(local: str) -> str | None:
    """``"a b"`` -> ``a b`` with backslash escapes resolved; None when the quoting is malformed."""
    out: list[str] = []
    c: str | None
    chars = iter(local[1:-1])
    for c in chars:
        if c == "\\":
            c = next(chars, None)
            if c is None:
                return None
        elif c == '"':
            return None
        out.append(c)
    return "".join(out)


def _safe_name(name: str, max_octets: int) -> bool:
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        return False
    try:
        if len(name.encode("utf-8")) > max_octets:
            return False
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        return False
    return not any(unicodedata.category(c) in _BAD_CATEGORIES for c in name)


def _safe_domain(domain: str) -> bool:
    if not _safe_name(domain, MAX_DOMAIN_OCTETS):
        return False
    for label in domain.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True


def mailbox_path(mail_root: str, address: str) -> str | None:
    """``mail_root/<domain>/<local-part>`` (both lower-cased, NFC), or None when either part is not
    a safe directory name (the RCPT stage then answers 550 5.1.1).

    Refused: empty, ``.``/``..``, a leading dot, ``/`` or ``\\``, control or invisible characters,
    a local part over 64 octets, a domain that is not a host name; a quoted local part is unquoted
    (quoted-pairs resolved) and then must be safe, without a ``"`` left in it. The result never leaves ``mail_root``.
    """
    local: str | None
    local, at, domain = address.rpartition("@")
    if not at:
        return None
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = _unquote(local)
        if local is None or '"' in local:
            return None
    local = unicodedata.normalize("NFC", local).lower()
    domain = unicodedata.normalize("NFC", domain).lower()
    if not _safe_name(local, MAX_LOCAL_OCTETS) or not _safe_domain(domain):
        return None
    path = os.path.join(mail_root, domain, local)
    root = os.path.realpath(mail_root)
    real = os.path.realpath(path)
    if real == root or os.path.commonpath([root, real]) != root:
        return None
    return path


def split_delimiter(address: str, delimiter: str) -> tuple[str, str]:
    """``alice+tag@d`` -> (``alice@d``, ``tag``) at the first ``delimiter``; (address, "") without one."""
    local, at, domain = address.rpartition("@")
    if delimiter and at and not local.startswith('"'):
        base, sep, ext = local.partition(delimiter)
        if sep and base:
            return f"{base}@{domain}", ext
    return address, ""


_FOLDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def folder_name(extension: str) -> str | None:
    """The Maildir++ sub-folder (``.tag``) for an address extension, when it is a plain name."""
    extension = unicodedata.normalize("NFC", extension).lower()
    return f".{extension}" if _FOLDER_NAME.match(extension) else None


_DELIVERED_TO = re.compile(rb"^delivered-to:[ \t]*(.*)$", re.I | re.M)


def delivered_to_values(body: bytes) -> frozenset[str]:
    """The ``Delivered-To:`` addresses (lower-cased) in the header of an LF-terminated message."""
    end = body.find(b"\n\n")
    head = body[: end + 1] if end >= 0 else body
    return frozenset(m.group(1).strip().decode("utf-8", "replace").lower() for m in _DELIVERED_TO.finditer(head))


def _maildir_host(hostname: str) -> str:
    """The host part of a Maildir file name: ``/`` and ``:`` escaped as the Maildir convention says."""
    return hostname.replace("/", "\\057").replace(":", "\\072")


@implementer(IDeliveryAgent)
class MaildirDeliveryAgent:
    """Delivers local recipients into ``mail_root/<domain>/<local>/`` Maildirs, durably, off the reactor.

    Each recipient gets its own file (its ``Delivered-To`` differs): written in ``tmp/`` with
    ``Return-Path`` and ``Delivered-To`` prepended (CRLF turned into LF), fsynced, renamed into
    ``new/``, and ``new/`` fsynced (shared between concurrent deliveries) before DELIVERED.

    With a recipient ``delimiter``, ``alice+tag@`` goes to alice's Maildir (its Maildir++ folder
    ``.tag`` with ``delimiter_folders``). With ``quotas``, a message that would take a mailbox past
    its quota is deferred (``452 4.2.2``) or bounced (``552 5.2.2``) as ``quota_action`` says.
    """

    def __init__(
        self,
        mail_root: str,
        hostname: str,
        reactor: Any,
        threadpool: Any,
        ops: FileOps | None = None,
        delimiter: str = "",
        delimiter_folders: bool = False,
        quotas: maildir_quota.Quotas | None = None,
        quota_action: str = "defer",
    ) -> None:
        self.mail_root = mail_root
        self.hostname = hostname
        self._host = _maildir_host(hostname)
        self._reactor = reactor
        self._threadpool = threadpool
        self._ops = ops or FileOps()
        self._syncer = DirSyncer(self._ops)
        self._seq = itertools.count(1)
        self._ready: set[str] = set()  # Maildirs known to exist with tmp/ new/ cur/
        self.delimiter = delimiter
        self.delimiter_folders = delimiter_folders
        self.quotas = quotas if quotas else None
        self.quota_action = quota_action

    def deliver(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> defer.Deferred[Any]:
        return deferToThreadPool(self._reactor, self._threadpool, self._deliver_all, envelope, recipients, body)

    def _deliver_all(self, envelope: Envelope, recipients: list[Recipient], body: bytes) -> list[DeliveryResult]:
        body = body.replace(b"\r\n", b"\n")
        sender = envelope.sender.replace("\r", "").replace("\n", "")  # never a header injection
        return_path = f"Return-Path: <{sender}>\n".encode()
        delivered_to = delivered_to_values(body)
        results = []
        for r in recipients:
            if r.address.lower() in delivered_to:  # it was here before: a forwarding loop (as Postfix's local says)
                log.warn("mail forwarding loop for {rcpt}", qid=envelope.qid, rcpt=r.address, code=554, enhanced="5.4.6")
                results.append(DeliveryResult(r.address, FAILED, 554, "5.4.6", f"Mail forwarding loop for {r.address}"))
            else:
                results.append(self._deliver_one(envelope.qid, r.address, return_path, body, r.orcpt))
        return results

    def _deliver_one(self, qid: str, address: str, return_path: bytes, body: bytes, orcpt: str | None = None) -> DeliveryResult:
        base, extension = split_delimiter(address, self.delimiter)
        path = mailbox_path(self.mail_root, base)
        if path is None:
            log.warn("unsafe local mailbox name {rcpt}", qid=qid, rcpt=address, code=550, enhanced="5.1.1")
            return DeliveryResult(address, FAILED, 550, "5.1.1", "Bad destination mailbox address")
        original = orcpt.partition(";")[2] if orcpt and orcpt.lower().startswith("rfc822;") else ""
        original_to = f"X-Original-To: {original}\n".encode() if original and original.lower() != address.lower() else b""
        data = b"".join((return_path, original_to, f"Delivered-To: {address}\n".encode(), body))
        if self.quotas is not None:
            over = self._over_quota(qid, address, base, path, len(data))
            if over is not None:
                return over
        folder = folder_name(extension) if extension and self.delimiter_folders else None
        try:
            name = self._write(os.path.join(path, folder) if folder else path, data, folder is not None)
            if self.quotas is not None and self.quotas.limit_for(base):
                maildir_quota.add(path, self.quotas.limit_for(base), len(data))
        except OSError as e:
            self._ready.discard(path)
            if is_space_error(e):
                code, enhanced, text = 452, "4.3.1", "Insufficient system storage for local delivery"
            else:
                code, enhanced, text = 451, "4.3.0", f"Local delivery error: {e.strerror or e}"
            log.warn(
                "local delivery to {rcpt} deferred: {error}",
                qid=qid, rcpt=address, code=code, enhanced=enhanced, error=str(e),
            )  # fmt: skip
            return DeliveryResult(address, DEFERRED, code, enhanced, text)
        return DeliveryResult(address, DELIVERED, 250, "2.0.0", "delivered to maildir", extra={"file": name})

    def _over_quota(self, qid: str, address: str, base: str, maildir: str, size: int) -> DeliveryResult | None:
        """The result for a message that does not fit the mailbox's quota, else None."""
        assert self.quotas is not None
        limit = self.quotas.limit_for(base)
        if not limit:
            return None
        used = maildir_quota.usage(maildir, limit, self._reactor.seconds(), size)
        if used + size <= limit:
            return None
        status, code, enhanced = (FAILED, 552, "5.2.2") if self.quota_action == "bounce" else (DEFERRED, 452, "4.2.2")
        log.info("mailbox {rcpt} over quota ({used} + {size} > {limit} octets)", qid=qid, rcpt=address, used=used,
                 size=size, limit=limit, code=code, enhanced=enhanced, event="over_quota")  # fmt: skip
        return DeliveryResult(address, status, code, enhanced, "Mailbox full: quota exceeded")

    def _write(self, maildir: str, data: bytes, folder: bool = False) -> str:
        """Write one message into ``maildir`` durably; returns its path under ``new/``."""
        try:
            return self._write_once(maildir, data, folder)
        except FileNotFoundError:  # the Maildir was removed since we made it: make it again
            self._ready.discard(maildir)
            return self._write_once(maildir, data, folder)

    def _write_once(self, maildir: str, data: bytes, folder: bool = False) -> str:
        self._make_maildir(maildir, folder)
        # The wall clock is meant here: Maildir names start with the delivery's Unix time (readers sort
        # and age by it); this runs in the I/O pool, where no reactor clock is read.
        now = time.time()
        # ",S=" carries the size (Maildir++), so quota recounts need no stat
        name = f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(self._seq)}.{self._host},S={len(data)}"
        tmp = os.path.join(maildir, "tmp", name)
        new_dir = os.path.join(maildir, "new")
        final = os.path.join(new_dir, name)
        write_new_file(self._ops, tmp, data)
        try:
            self._ops.rename(tmp, final)
        except OSError:
            discard(self._ops, tmp)
            raise
        self._syncer.sync((new_dir,))
        return final

    def _make_maildir(self, maildir: str, folder: bool = False) -> None:
        """Create ``maildir`` with tmp/ new/ cur/ (mode 0700) and fsync the parents of what was created;
        a Maildir++ sub-folder also gets its ``maildirfolder`` marker."""
        if maildir in self._ready:
            return
        created: set[str] = set()
        for sub in ("tmp", "new", "cur"):
            path = os.path.join(maildir, sub)
            missing = []
            while not os.path.isdir(path):
                missing.append(path)
                path = os.path.dirname(path)
            for path in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
                created.add(os.path.dirname(path))
        if folder and not os.path.exists(os.path.join(maildir, "maildirfolder")):
            with contextlib.suppress(FileExistsError):
                write_new_file(self._ops, os.path.join(maildir, "maildirfolder"), b"")
            created.add(maildir)
        if created:
            self._syncer.sync(created)
        self._ready.add(maildir)
