"""TLS contexts: the server's (TLS 1.2+, forward-secret ciphers, reloadable) and the client's
(opportunistic or verified with service_identity), on pyOpenSSL through twisted.internet.ssl."""

from __future__ import annotations

import os
import ssl as stdlib_ssl
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="pymta.tls")

# Forward secrecy only (ECDHE / DHE key exchange), AEAD ciphers only; TLS 1.3 suites are all FS.
SERVER_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
_HARDENING = (
    SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1 | SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE | SSL.OP_SINGLE_DH_USE
)  # fmt: skip


class TLSConfigError(Exception):
    """A certificate or key cannot be used; the text names the file and the reason, ``key`` the
    configuration key (``tls.cert`` or ``tls.key``)."""

    def __init__(self, text: str, key: str = "") -> None:
        super().__init__(text)
        self.key = key


def _server_context(cert_path: str, key_path: str) -> SSL.Context:
    for path, key in ((cert_path, "tls.cert"), (key_path, "tls.key")):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{path}: no such file", key)
        if not os.access(path, os.R_OK):
            raise TLSConfigError(f"{path}: not readable (permission denied)", key)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_HARDENING)
    try:
        ctx.set_cipher_list(SERVER_CIPHERS)
        ctx.use_certificate_chain_file(cert_path)
    except SSL.Error as e:
        raise TLSConfigError(f"{cert_path}: not a usable PEM certificate chain ({_ssl_reason(e)})", "tls.cert") from None
    try:
        ctx.use_privatekey_file(key_path)
        ctx.check_privatekey()
    except SSL.Error as e:
        raise TLSConfigError(f"{key_path}: not a usable PEM private key for {cert_path} ({_ssl_reason(e)})",
                             "tls.key") from None  # fmt: skip
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_session_id(b"pymta")
    return ctx


def _ssl_reason(error: SSL.Error) -> str:
    try:
        return "; ".join(str(part[2]) for part in error.args[0]) or "OpenSSL error"
    except (IndexError, TypeError):
        return str(error)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The listener's TLS connection creator; :meth:`reload` swaps in a new certificate (SIGHUP).

    It provides the current interface (not a bare ``getContext``), so Twisted does not warn
    (LegacyContextFactoryWarning) on every TLS start.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._context = _server_context(cert_path, key_path)

    def reload(self) -> bool:
        """Load the files again; on failure keep serving the old certificate and log why."""
        try:
            self._context = _server_context(self.cert_path, self.key_path)
        except TLSConfigError as e:
            log.error("certificate reload failed, keeping the old one: {why}", why=str(e))
            return False
        log.info("certificate reloaded from {cert}", cert=self.cert_path)
        return True

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def client_tls(hostname: str, verify: bool = False, ca_file: str | None = None) -> Any:
    """A client connection creator for STARTTLS to ``hostname``.

    ``verify``: the chain must lead to the system trust store (or ``ca_file``) and the name must
    match (service_identity); otherwise any certificate is taken (opportunistic TLS, RFC 7435).
    """
    if verify:
        return ssl.optionsForClientTLS(hostname, trustRoot=trust_root(ca_file))
    return ssl.CertificateOptions(verify=False)


def trust_root(ca_file: str | None = None) -> Any:
    """The system trust store, or the PEM certificate in ``ca_file`` (e.g. a private CA)."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        return ssl.Certificate.loadPEM(f.read())


def certificate_problem(transport: Any, hostname: str, ca_file: str | None = None) -> str | None:
    """What is wrong with the TLS session on ``transport`` for ``hostname``, as an RFC 8460
    result type (``starttls-not-supported``, ``certificate-expired``, ``certificate-not-trusted``,
    ``certificate-host-mismatch``, ``validation-failure``), or None when it would have verified.
    For sessions made without verification (MTA-STS testing mode reports what enforce would do)."""
    from OpenSSL import crypto
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname

    conn = getattr(transport, "getHandle", lambda: None)()
    if conn is None or not hasattr(conn, "get_peer_cert_chain"):
        return "starttls-not-supported"
    chain = conn.get_peer_cert_chain() or []
    if not chain:
        return "validation-failure"
    store = crypto.X509Store()
    try:
        if ca_file:
            store.load_locations(ca_file)
        else:  # the system trust store (pyOpenSSL's X509Store has no set_default_paths)
            paths = stdlib_ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        return "certificate-expired" if e.errors and e.errors[0] == 10 else "certificate-not-trusted"  # 10: expired
    except (crypto.Error, OSError):
        return "validation-failure"
    try:
        verify_hostname(conn, hostname)
    except VerificationError:
        return "certificate-host-mismatch"
    except Exception:
        return "validation-failure"
    return None


def describe_tls(transport: Any) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for a TLS transport, else None."""
    conn = getattr(transport, "getHandle", lambda: None)()
    if conn is None or not hasattr(conn, "get_protocol_version_name"):
        return None
    try:
        return f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
    except SSL.Error:
        return None
