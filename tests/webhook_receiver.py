"""A webhook receiver for the tests: a small twisted.web server on loopback.

``python -m tests.webhook_receiver PORT LOG MODE_FILE``: every POST is appended to LOG as one
JSON line (headers, body); the answer's status is the number in MODE_FILE, read per request
(``200``, ``500``, ``400`` ...), so a test changes the receiver's behaviour while it runs.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.web import resource, server


class Hook(resource.Resource):
    isLeaf = True

    def __init__(self, log_path: str, mode_path: str) -> None:
        super().__init__()
        self.log_path = log_path
        self.mode_path = mode_path

    def render_POST(self, request):
        with open(self.mode_path, encoding="ascii") as f:
            status = int(f.read().strip() or "200")
        body = request.content.read()
        headers = {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"status": status, "headers": headers, "body": body.decode("utf-8")}) + "\n")
        request.setResponseCode(status)
        return b"ok\n"


def main() -> None:
    port, log_path, mode_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    reactor.listenTCP(port, server.Site(Hook(log_path, mode_path)), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
