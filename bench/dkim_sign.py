#!/usr/bin/env python3
"""Cost of one DKIM signature in-process: pymta's signer (dkimpy canonicalisation, OpenSSL keys)
for RSA-2048 and Ed25519, and dkimpy's own pure-Python RSA signer for comparison.

  python3 bench/dkim_sign.py [SIZE ...]     (message sizes in octets; default 2048 51200)
"""

import sys
import time

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pymta.auth.dkim import SigningKey, sign_message

HEADERS = ("from", "to", "subject", "date", "message-id")


def message(size: int) -> bytes:
    head = (b"From: News <news@bench.example>\r\nTo: someone@example.net\r\nSubject: bench\r\n"
            b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <b@bench.example>\r\n\r\n")  # fmt: skip
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def per_call(function, seconds: float = 1.5) -> float:
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        function()
        n += 1
    return (time.process_time() - start) / n * 1000


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [2048, 51200]
    rsa_key = rsa.generate_private_key(65537, 2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    keys = {
        "RSA-2048": SigningKey("bench.example", "b", "rsa-sha256", rsa_key, "-", HEADERS, ("from",)),
        "Ed25519": SigningKey("bench.example", "b", "ed25519-sha256", ed_key, "-", HEADERS, ("from",)),
    }
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())  # fmt: skip
    print("| size | pymta RSA-2048 ms | pymta Ed25519 ms | dkimpy pure-Python RSA-2048 ms |")
    print("|---|---|---|---|")
    for size in sizes:
        msg = message(size)
        cells = [f"{per_call(lambda k=k, msg=msg: sign_message(msg, k, 0)):.3f}" for k in keys.values()]
        pure = per_call(lambda msg=msg: dkim.sign(msg, b"b", b"bench.example", pem, canonicalize=(b"relaxed", b"relaxed"),
                                          include_headers=[h.encode() for h in HEADERS]))  # fmt: skip
        print(f"| {size} | " + " | ".join(cells) + f" | {pure:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
