"""A certificate authority for tests: a CA and leaf certificates it signs (PEM files), made with
the cryptography package; a leaf may be expired or name another host."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class TestCA:
    __test__ = False  # not a test class for pytest
    directory: str
    key: Any
    cert: x509.Certificate
    cert_path: str

    def issue(self, name: str, expired: bool = False, tag: str = "") -> tuple[str, str]:
        """(cert path, key path) of a leaf for ``name`` signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired else (
            now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))  # fmt: skip
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        base = os.path.join(self.directory, f"{name}{tag}{'-expired' if expired else ''}")
        return _write(base, cert, key)


def make_ca(directory: str, name: str = "pymta test CA") -> TestCA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, _ = _write(os.path.join(directory, "ca"), cert, key)
    return TestCA(directory, key, cert, cert_path)


def _write(base: str, cert: x509.Certificate, key: Any) -> tuple[str, str]:
    cert_path, key_path = base + ".crt", base + ".key"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def server_options(cert_path: str, key_path: str) -> Any:
    """A Twisted TLS server context factory for the leaf (``reactor.listenSSL``, a peer's STARTTLS)."""
    from twisted.internet import ssl

    with open(cert_path, "rb") as c, open(key_path, "rb") as k:
        return ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
