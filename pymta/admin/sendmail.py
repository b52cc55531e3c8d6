"""``pymta-sendmail`` (also installed as ``sendmail``): the Sendmail command line cron, PHP, Mutt and
Git use, handing the message to the running MTA over its local submission socket.

The socket (``[sendmail] socket``; here ``$PYMTA_SENDMAIL_SOCKET``, else
:data:`DEFAULT_SOCKET`) is SMTP on a UNIX socket: the MTA learns the submitting Unix user from the
kernel, so this command needs no configuration file, no privileges and no password. It exits 0
only once the MTA has answered 250 (the message is on disk), 75 (EX_TEMPFAIL) when the MTA is
down or answers 4xx — the caller keeps the message and retries —, 67 when every recipient is
refused, 65 for a message it cannot send (no recipients), 64 for a usage error.

Options: ``-t`` (recipients from To/Cc/Bcc, Bcc removed), ``-f SENDER``, ``-F NAME``, ``-i``/``-oi``
(a lone dot does not end the message), ``-bs`` (SMTP on standard input/output), ``-bp``
(``mailq``), ``-q`` (flush the queue); ``-bm``, ``-oem``, ``-odi``, ``-odb``, ``-v``, ``-U``,
``-B TYPE``, ``-N DSN``, ``-R RET``, ``-V ENVID``, ``-X FILE``, ``-C FILE``, ``-L TAG`` are accepted and ignored.
"""

from __future__ import annotations

import getpass
import os
import selectors
import smtplib
import socket
import sys
import time
from email.utils import getaddresses, make_msgid
from typing import Any, cast

from pymta.dates import header_date

DEFAULT_SOCKET = "/run/pymta/sendmail.sock"
EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_SOFTWARE, EX_TEMPFAIL = 0, 64, 65, 67, 70, 75
MAX_MESSAGE = 1 << 30  # read from standard input at most this much
TIMEOUT = 300.0  # each SMTP reply (the 250 after the data waits for the disk and any content scan)

_IGNORED_WITH_ARG = {"B", "N", "R", "V", "X", "C", "L", "O", "h", "p"}


class UsageError(Exception):
    pass


def socket_path() -> str:
    return os.environ.get("PYMTA_SENDMAIL_SOCKET") or DEFAULT_SOCKET


class _UnixSMTP(smtplib.SMTP):
    """smtplib over the local submission socket."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        super().__init__(timeout=timeout)
        self.connect(path)

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            self.sock = None
            raise
        self.file = None
        code, msg = self.getreply()
        if code != 220:
            self.close()
            raise smtplib.SMTPConnectError(code, msg)
        return code, msg


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"mode": "m", "t": False, "i": False, "f": None, "F": None, "rcpts": []}
    args = iter(argv)
    for arg in args:
        if arg == "--":
            opts["rcpts"].extend(args)
            break
        if not arg.startswith("-") or arg == "-":
            opts["rcpts"].append(arg)
            continue
        flag, rest = arg[1:2], arg[2:]
        if flag in ("f", "F", "r"):
            value = rest or next(args, None)
            if value is None:
                raise UsageError(f"option -{flag} needs a value")
            opts["F" if flag == "F" else "f"] = value
        elif flag == "b":
            if rest not in ("m", "s", "p", "d", "D"):
                raise UsageError(f"unsupported mode -b{rest}")
            opts["mode"] = rest
        elif flag == "o":
            if rest == "i":
                opts["i"] = True
            elif rest in ("", "B", "F", "R", "L") or rest[:1] in ("e", "d", "m", "Q"):
                pass  # -oem, -odi, -odb, -om, -oQ...: Sendmail's old knobs, nothing to do here
            else:
                pass
        elif flag == "i" and not rest:
            opts["i"] = True
        elif flag == "t" and not rest:
            opts["t"] = True
        elif flag == "q":
            opts["mode"] = "q"
        elif flag in ("v", "U", "m", "n", "G", "d", "A", "E", "x") or flag == "":
            pass
        elif flag in _IGNORED_WITH_ARG:
            if not rest and next(args, None) is None:
                raise UsageError(f"option -{flag} needs a value")
        else:
            raise UsageError(f"unknown option {arg}")
    return opts


def read_message(stream: Any, dot_ends: bool) -> bytes:
    """Standard input up to EOF (or a lone ``.`` line unless -i), CRLF line ends."""
    lines = []
    size = 0
    for raw in stream:
        size += len(raw)
        if size > MAX_MESSAGE:
            raise UsageError(f"message larger than {MAX_MESSAGE} octets")
        line = raw.rstrip(b"\r\n")
        if dot_ends and line == b".":
            break
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def _header_split(message: bytes) -> tuple[bytes, bytes]:
    if message.startswith(b"\r\n"):
        return b"", message
    end = message.find(b"\r\n\r\n")
    return (message[: end + 2], message[end + 2 :]) if end >= 0 else (message, b"")


def _fields(head: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1] if head else []:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def recipients_from_headers(message: bytes) -> tuple[list[str], bytes]:
    """-t: the addresses in To, Cc and Bcc (resent-* ignored), and the message without Bcc."""
    head, body = _header_split(message)
    values, kept = [], []
    for field in _fields(head):
        name = field.split(b":", 1)[0].strip().lower()
        if name in (b"to", b"cc", b"bcc"):
            values.append(" ".join(field.split(b":", 1)[1].decode("utf-8", "replace").split()))
        if name != b"bcc":
            kept.append(field)
    rcpts = [address for _, address in getaddresses(values) if address]
    return rcpts, b"".join(f + b"\r\n" for f in kept) + body


def complete_headers(message: bytes, sender: str, full_name: str | None, hostname: str) -> bytes:
    """Adds From: (with -F's name), Date: and Message-ID: where the message has none."""
    head, body = _header_split(message)
    names = {f.split(b":", 1)[0].strip().lower() for f in _fields(head)}
    added = []
    if b"from" not in names:
        name = (full_name or "").replace('"', "").replace("\r", "").replace("\n", "")
        added.append(f'From: "{name}" <{sender}>' if name else f"From: {sender}")
    if b"date" not in names:
        added.append(f"Date: {header_date(time.time(), localtime=True)}")
    if b"message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}")
    if not head and not body.startswith(b"\r\n"):
        body = b"\r\n" + body
    return b"".join(a.encode("utf-8") + b"\r\n" for a in added) + head + body


def submit(path: str, sender: str, rcpts: list[str], message: bytes, err: Any) -> int:
    try:
        client = _UnixSMTP(path, TIMEOUT)
    except (OSError, smtplib.SMTPException) as e:
        err.write(f"sendmail: the mail system is not available ({path}: {e}); try again later\n")
        return EX_TEMPFAIL
    try:
        client.ehlo(socket.gethostname())
        code, text = client.mail(sender)
        if code != 250:
            err.write(f"sendmail: sender <{sender}> refused: {code} {text.decode(errors='replace')}\n")
            return EX_TEMPFAIL if 400 <= code < 500 else EX_DATAERR
        accepted, temporary = 0, 0
        for r in rcpts:
            code, text = client.rcpt(r)
            if code in (250, 251):
                accepted += 1
            else:
                temporary += 400 <= code < 500
                err.write(f"sendmail: recipient <{r}> refused: {code} {text.decode(errors='replace')}\n")
        if not accepted:
            client.rset()
            return EX_TEMPFAIL if temporary else EX_NOUSER
        code, text = client.data(message)
        if code != 250:
            err.write(f"sendmail: message refused: {code} {text.decode(errors='replace')}\n")
            return EX_TEMPFAIL if 400 <= code < 500 else EX_DATAERR
        client.quit()
        return EX_OK
    except smtplib.SMTPDataError as e:  # a refusal of DATA itself
        err.write(f"sendmail: message refused: {e.smtp_code} {cast(bytes, e.smtp_error).decode(errors='replace')}\n")
        return EX_TEMPFAIL if 400 <= e.smtp_code < 500 else EX_DATAERR
    except (OSError, smtplib.SMTPException) as e:
        err.write(f"sendmail: lost the mail system ({e}); try again later\n")
        return EX_TEMPFAIL
    finally:
        client.close()


def smtp_on_stdio(path: str, stdin: Any, stdout: Any) -> int:
    """-bs: standard input and output spliced onto the submission socket."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError as e:
        stdout.write(f"421 4.3.0 the mail system is not available: {e}\r\n".encode())
        stdout.flush()
        return EX_TEMPFAIL
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin, selectors.EVENT_READ)
    with sock:
        while True:
            events = selector.select(TIMEOUT)
            if not events:
                return EX_TEMPFAIL
            for key, _ in events:
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return EX_OK
                    stdout.write(data)
                    stdout.flush()
                else:
                    data = os.read(stdin.fileno(), 65536)
                    if not data:  # no half-close: the MTA would take it for a lost client mid-message
                        selector.unregister(stdin)
                    else:
                        sock.sendall(data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    err = sys.stderr
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sendmail"
    if prog in ("mailq",) and not argv:
        argv = ["-bp"]
    try:
        opts = parse_args(argv)
    except UsageError as e:
        err.write(f"sendmail: {e}\n")
        return EX_USAGE
    path = socket_path()
    if opts["mode"] in ("p", "q"):
        from pymta.admin.cli import queue_main

        return queue_main(["list"] if opts["mode"] == "p" else ["flush"]) or EX_OK
    if opts["mode"] == "s":
        return smtp_on_stdio(path, sys.stdin.buffer, sys.stdout.buffer)
    if opts["mode"] in ("d", "D"):
        err.write("sendmail: daemon mode is twistd pymta\n")
        return EX_USAGE
    user = getpass.getuser()
    hostname = socket.gethostname()
    sender = opts["f"] if opts["f"] is not None else f"{user}@{hostname}"
    sender = sender.strip("<>") if sender not in ("<>",) else ""
    try:
        message = read_message(sys.stdin.buffer, dot_ends=not opts["i"])
    except UsageError as e:
        err.write(f"sendmail: {e}\n")
        return EX_DATAERR
    rcpts = list(opts["rcpts"])
    if opts["t"]:
        from_headers, message = recipients_from_headers(message)
        rcpts = from_headers + rcpts
    rcpts = [a for _, a in getaddresses(rcpts) if a] if rcpts else []
    if not rcpts:
        err.write("sendmail: no recipients\n")
        return EX_DATAERR
    message = complete_headers(message, sender or f"{user}@{hostname}", opts["F"], hostname)
    return submit(path, sender, rcpts, message, err)


def run() -> None:
    sys.exit(main())
