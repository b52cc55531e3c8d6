"""The control socket (``state_dir/control.sock``, UNIX, mode 0600): JSON requests from pymta-queue.

One request per line, ``{"cmd": "flush"}``, ``{"cmd": "hold", "qid": "..."}`` or
``{"cmd": "flush", "domain": "example.com"}``; one answer per
line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Postfix's queue
manager takes its triggers the same way.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from pymta.admin.queue_ops import QueueOperations, QueueOpError

log = Logger(namespace="pymta.admin")


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            command = str(request["cmd"])
            target = request.get("qid")
            domain = request.get("domain")
            args = request.get("args")
            if not isinstance(target, str | None) or not isinstance(domain, str | None):
                raise TypeError("qid and domain are strings")
            if not isinstance(args, dict | None):
                raise TypeError("args is an object")
        except (ValueError, KeyError, TypeError):
            self._answer({"ok": False, "error": "malformed request"})
            return
        log.info("control request {cmd} {qid} {domain}", cmd=command, qid=target, domain=domain or "")
        d = defer.maybeDeferred(self.factory.operations.run, command, target, domain, args)
        d.addCallbacks(lambda result: {"ok": True, "result": result}, self._failed)
        d.addCallback(self._answer)

    def _failed(self, failure: Any) -> dict[str, Any]:
        if failure.check(QueueOpError):
            return {"ok": False, "error": failure.getErrorMessage()}
        log.failure("control request failed", failure)
        return {"ok": False, "error": f"internal error: {failure.getErrorMessage()}"}

    def _answer(self, answer: dict[str, Any]) -> None:
        if self.transport is not None:
            cast(Any, self.transport).write(json.dumps(answer).encode() + b"\n")  # an ITransport: mypy has no zope plugin


class ControlFactory(Factory):
    protocol = ControlProtocol

    def __init__(self, operations: QueueOperations) -> None:
        self.operations = operations


def control_service(path: str, operations: QueueOperations, reactor: Any = None) -> internet.UNIXServer:
    """The control socket listener; ``wantPID`` takes a lock beside the socket, so a socket file
    left by a killed process is replaced and a second running MTA is refused."""
    return internet.UNIXServer(path, ControlFactory(operations), mode=0o600, wantPID=True, reactor=reactor)
