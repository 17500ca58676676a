"""TLS contexts for HBONE and the SPIFFE checks on the peer after the handshake.

Owns the ``ssl.SSLContext`` builders for both ends of an HBONE connection (TLS 1.3 only, ALPN ``h2``,
mutual authentication against the mesh roots, no SNI, no session resumption) and the identity checks
ztunnel does in its rustls verifiers: the client accepts only a server whose single SPIFFE URI SAN is
one of the expected identities, the server accepts only clients of its own trust domain.

Python's ``ssl`` cannot run a custom verifier inside the handshake, so callers must call
``verify_server_identity`` / ``verify_client_identity`` right after the handshake and before sending or
reading any application byte; on failure, close the connection.

Contexts are cached per certificate, so each certificate is loaded once; a rotated certificate gets
a new context for new connections while existing connections keep the one they were made with.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator

from cryptography import x509

from ztunnel.identity.ca import WorkloadCertificate
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

ALPN_H2 = "h2"
# What ztunnel offers, strongest first. Python's ssl module has no API for TLS 1.3 ciphersuites, so
# OpenSSL's default list applies (it also contains TLS_CHACHA20_POLY1305_SHA256); with
# OP_CIPHER_SERVER_PREFERENCE the server's order picks AES-256-GCM whenever the client offers it.
TLS13_CIPHERSUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
_CACHE_SIZE = 256


class PeerIdentityError(Exception):
    """The TLS peer's certificate does not carry an acceptable SPIFFE identity."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_server_cache: OrderedDict[WorkloadCertificate, ssl.SSLContext] = OrderedDict()
_client_cache: OrderedDict[WorkloadCertificate, ssl.SSLContext] = OrderedDict()


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """The context for an HBONE listener presenting ``cert`` (cached per certificate)."""
    return _cached(_server_cache, cert, _build_server_context)


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """The context for an outbound HBONE connection as ``cert`` (cached per certificate).

    Connect with ``server_hostname=None`` (no SNI: the peer is addressed by IP) and then call
    ``verify_server_identity`` before writing anything.
    """
    return _cached(_client_cache, cert, _build_client_context)


def clear_context_cache() -> None:
    """Forget every cached context (tests; or to release old certificates' contexts at once)."""
    with _lock:
        _server_cache.clear()
        _client_cache.clear()


def _cached(
    cache: OrderedDict[WorkloadCertificate, ssl.SSLContext],
    cert: WorkloadCertificate,
    build: Callable[[WorkloadCertificate], ssl.SSLContext],
) -> ssl.SSLContext:
    # Keyed by the whole certificate value (serial, chain, key, roots): two CAs may reuse a serial.
    with _lock:
        ctx = cache.get(cert)
        if ctx is not None:
            cache.move_to_end(cert)
            return ctx
    ctx = build(cert)  # outside the lock: loading takes a while, a duplicate build is harmless
    with _lock:
        cache[cert] = ctx
        cache.move_to_end(cert)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return ctx


def _base_context(protocol: int, cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    # Strict RFC 5280 checks (e.g. an empty subject needs a critical SAN; CA certs need CA:true).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols([ALPN_H2])
    try:
        ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as err:
        raise ValueError(f"trusted roots of {cert.identity} cannot be loaded: {err}") from None
    _load_chain(ctx, cert)
    return ctx


def _build_server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, cert)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0  # no TLS 1.3 session resumption: every connection is fully authenticated
    return ctx


def _build_client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert)
    # Identity is checked against SPIFFE SANs by verify_server_identity, not against a host name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    """Load chain + key; ``ssl`` only reads files, so use an anonymous in-memory file."""
    with _key_file(cert.chain_pem + b"\n" + cert.key_pem) as path:
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as err:
            raise ValueError(
                f"certificate/key of {cert.identity} (serial {cert.serial:#x}) cannot be loaded: "
                f"{err}"
            ) from None


@contextlib.contextmanager
def _key_file(data: bytes) -> Iterator[str]:
    # memfd: never on a file system, gone when closed. Fallback: 0600 file in /dev/shm (tmpfs),
    # unlinked right after loading.
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("hbone-identity", os.MFD_CLOEXEC)
        except OSError:
            pass
        else:
            try:
                _write_all(fd, data)
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="hbone-", suffix=".pem", dir=directory)
    try:
        _write_all(fd, data)
        os.close(fd)
        fd = -1
        yield path
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --------------------------------------------------------------------------------------------------
# Peer identity
# --------------------------------------------------------------------------------------------------


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE identity of the verified TLS peer.

    The peer's leaf must carry exactly one URI SAN, made only of printable ASCII, that parses as an
    Istio SPIFFE ID. DNS and other SAN types are ignored. Raises ``PeerIdentityError``.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    return identity_from_der(der)


def identity_from_der(der: bytes) -> SpiffeId:
    """The SPIFFE identity in a DER leaf certificate (same rules as ``peer_identity``)."""
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise PeerIdentityError(f"peer certificate cannot be parsed: {err}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerIdentityError("peer certificate has no subjectAltName") from None
    except ValueError as err:
        raise PeerIdentityError(f"peer certificate extensions are malformed: {err}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise PeerIdentityError("peer certificate has no URI SAN (a SPIFFE ID is required)")
    if len(uris) > 1:
        raise PeerIdentityError(
            f"peer certificate has {len(uris)} URI SANs {uris!r}; exactly one SPIFFE ID is allowed"
        )
    uri = uris[0]
    if not uri.isascii() or not uri.isprintable() or any(c in uri for c in " \x00"):
        raise PeerIdentityError(f"peer URI SAN {uri!r} has NUL or non-printable characters")
    try:
        return SpiffeId.parse(uri)
    except SpiffeIdError as err:
        raise PeerIdentityError(f"peer URI SAN is not a valid SPIFFE ID: {err}") from None


def verify_server_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Collection[SpiffeId]
) -> SpiffeId:
    """Client side: the server must be one of ``expected`` (destination workload + service SANs)."""
    peer = peer_identity(ssl_object)
    if not expected:
        raise PeerIdentityError(f"server identity {peer} cannot be checked: no expected identity")
    if peer not in expected:
        wanted = ", ".join(sorted(str(e) for e in expected))
        raise PeerIdentityError(f"server identity {peer} is not the expected one ({wanted})")
    return peer


def verify_client_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str
) -> SpiffeId:
    """Server side: the client must belong to ``trust_domain``; which identity is policy's business."""
    peer = peer_identity(ssl_object)
    if peer.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"client identity {peer} is from trust domain {peer.trust_domain!r}, "
            f"expected {trust_domain!r}"
        )
    return peer


def negotiated_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    return ssl_object.selected_alpn_protocol()


__all__ = [
    "ALPN_H2",
    "PeerIdentityError",
    "clear_context_cache",
    "client_context",
    "identity_from_der",
    "negotiated_alpn",
    "peer_identity",
    "server_context",
    "verify_client_identity",
    "verify_server_identity",
]
