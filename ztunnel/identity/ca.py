"""Workload certificates, CSRs, the CA client interface and the local (lab/test) CA.

Owns:
* ``WorkloadCertificate``: one issued identity (leaf-first chain, PKCS#8 key, trusted roots, validity).
* ``make_csr``: a fresh ECDSA P-256 key and a CSR whose only content is the SPIFFE URI SAN (as ztunnel's
  ``tls/csr.rs``: no CN, SAN marked critical because the subject is empty).
* ``certificate_from_chain``: turns a CA answer (PEM list, leaf first, root(s) last, as Istio's
  ``IstioCertificateResponse.cert_chain``) into a ``WorkloadCertificate`` after re-checking that the leaf
  really is the requested identity, matches our key and chains to the roots.
* ``CaClient``: the async signing interface (the gRPC Istio CA client and ``LocalCaClient`` implement it).
* ``LocalCa``: an in-memory/on-disk CA for the lab and tests, with root rotation; ``LocalCaClient``
  puts it behind ``CaClient`` with fault injection.
* ``ServingCertificate`` / ``LocalCa.issue_serving``: a server-auth leaf with DNS/IP SANs for the
  control plane's own gRPC endpoint (as istiod's DNS certificate); kept apart from SPIFFE issuance,
  which stays strict (exactly one URI SAN).

No sockets, no asyncio, no ssl: pure ``cryptography`` code, time passed in through a clock.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.config import DEFAULT_TRUST_DOMAIN
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_SERVING_TTL = timedelta(hours=24)

# RFC 1123 host name label (no wildcards: the control plane serves exact names).
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class CaError(Exception):
    """The CA could not issue a certificate (base class for CA failures)."""


class CsrRejected(CaError):
    """The CA refused a CSR: bad signature, wrong key type, or SANs other than the requested identity."""


class CaUnavailable(CaError):
    """The CA could not be reached (or, in tests, was told to behave as if it could not)."""


class ChainError(ValueError):
    """A certificate chain returned by a CA is unusable; the message says which certificate and why."""


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """One issued workload identity: what a TLS context needs, plus validity for rotation."""

    identity: SpiffeId
    chain_pem: bytes  # leaf first, then intermediates (PEM), no roots
    key_pem: bytes  # PKCS#8 PEM, unencrypted; lives in memory only
    roots_pem: bytes  # every trusted root, concatenated PEM
    not_before: datetime
    not_after: datetime
    serial: int

    def refresh_at(self) -> datetime:
        """When to renew: at half-life, as ztunnel does."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_valid(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after

    def __repr__(self) -> str:
        # Never print the key (logs, test failure output).
        return (
            f"WorkloadCertificate(identity={self.identity}, serial={self.serial:#x}, "
            f"not_before={self.not_before.isoformat()}, not_after={self.not_after.isoformat()})"
        )


@dataclass(frozen=True, slots=True)
class ServingCertificate:
    """A server certificate for the control plane's endpoint (DNS/IP SANs, server auth only)."""

    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    chain_pem: bytes  # leaf first, then intermediates (PEM), no roots
    key_pem: bytes  # PKCS#8 PEM, unencrypted; lives in memory only
    roots_pem: bytes  # every trusted root, concatenated PEM (what clients verify with)
    not_before: datetime
    not_after: datetime
    serial: int

    def refresh_at(self) -> datetime:
        """When to renew: at half-life, leaving the other half for retries."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def __repr__(self) -> str:
        return (
            f"ServingCertificate(dns_names={list(self.dns_names)}, serial={self.serial:#x}, "
            f"not_after={self.not_after.isoformat()})"
        )


def check_dns_name(name: str) -> str:
    """`name` lower-cased if it is a valid DNS host name (RFC 1123, no wildcard); else ValueError."""
    host = name.strip().lower().rstrip(".")
    if not host or len(host) > 253:
        raise ValueError(f"DNS name {name!r}: empty or longer than 253 characters")
    for label in host.split("."):
        if not _DNS_LABEL.match(label):
            raise ValueError(f"DNS name {name!r}: label {label!r} is not a RFC 1123 host label")
    return host


class CaClient(Protocol):
    """Something that signs CSRs for workload identities (Istio's CreateCertificate)."""

    async def sign(self, identity: SpiffeId, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        """Return PEM certificates leaf first; the LAST element(s) are the trusted root(s)."""
        ...


# --------------------------------------------------------------------------------------------------
# CSR and chain handling
# --------------------------------------------------------------------------------------------------


def make_csr(identity: SpiffeId) -> tuple[bytes, bytes]:
    """Make a fresh ECDSA P-256 key and a CSR carrying only the URI SAN of ``identity``.

    Returns ``(key_pem, csr_pem)``; the key is PKCS#8 PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        # Empty subject => the SAN must be critical (RFC 5280 4.2.1.6).
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = _pkcs8_pem(key)
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def load_pem_certificates(pem: bytes, *, what: str) -> list[x509.Certificate]:
    """Parse one or more concatenated PEM certificates; ``what`` names the source in errors."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise ChainError(f"{what}: not valid PEM certificates ({err})") from None
    return certs


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issued_by_any(cert: x509.Certificate, issuers: Sequence[x509.Certificate]) -> bool:
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def certificate_from_chain(
    identity: SpiffeId, key_pem: bytes, chain: list[bytes]
) -> WorkloadCertificate:
    """Build a ``WorkloadCertificate`` from a CA response, re-checking what the CA gave us.

    ``chain`` is leaf first; its last element holds the trusted root(s) (possibly several concatenated,
    as Istio sends during root rotation), and any self-signed certificates just before it are roots too.
    Checks: the leaf's only URI SAN is exactly ``identity``; the leaf's public key is ours; each
    certificate is signed by the next and the last intermediate by one of the roots.
    """
    if len(chain) < 2:
        raise ChainError(
            f"certificate chain for {identity} has {len(chain)} element(s); "
            "expected the leaf followed by at least one root"
        )
    parsed = [load_pem_certificates(pem, what=f"chain element {i}") for i, pem in enumerate(chain)]
    if any(not certs for certs in parsed):
        raise ChainError(f"certificate chain for {identity} has an empty element")
    if len(parsed[0]) != 1:
        raise ChainError(f"chain element 0 must be exactly one leaf, found {len(parsed[0])}")
    # Roots: the whole last element, plus trailing self-signed elements before it.
    split = len(parsed) - 1
    while split > 1 and all(_is_self_signed(c) for c in parsed[split - 1]):
        split -= 1
    leaf = parsed[0][0]
    intermediates = [c for certs in parsed[1:split] for c in certs]
    roots = [c for certs in parsed[split:] for c in certs]

    sans = uri_sans(leaf)
    if sans != [identity.uri]:
        raise ChainError(
            f"leaf certificate (serial {leaf.serial_number:#x}) has URI SANs {sans}; "
            f"expected exactly [{identity.uri!r}]"
        )
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ChainError(f"private key for {identity} is not a PEM private key ({err})") from None
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise ChainError(f"leaf certificate for {identity} does not match the private key")
    path = [leaf, *intermediates]
    for i, (child, parent) in enumerate(pairwise(path)):
        if not _issued_by_any(child, [parent]):
            raise ChainError(
                f"chain for {identity}: certificate {i} ({child.subject.rfc4514_string() or 'leaf'})"
                f" is not signed by certificate {i + 1} ({parent.subject.rfc4514_string()})"
            )
    if not _issued_by_any(path[-1], roots):
        raise ChainError(
            f"chain for {identity}: {path[-1].subject.rfc4514_string() or 'leaf'} is not signed "
            "by any of the returned roots"
        )
    return WorkloadCertificate(
        identity=identity,
        chain_pem=b"".join(_pem(c) for c in path),
        key_pem=key_pem,
        roots_pem=b"".join(_pem(c) for c in roots),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
    )


# --------------------------------------------------------------------------------------------------
# The local CA
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signer:
    """The key that signs leaves and the certificates from it up to (excluding) its root."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # signer cert first, then intermediates above it, no root
    root: x509.Certificate


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (kept in memory; written to disk only by ``save``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca_cert(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    ttl: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class LocalCa:
    """A small CA for the lab and tests: ECDSA P-256 root (optionally one intermediate), SPIFFE leaves.

    Only the newest root signs; after ``rotate_root`` the older roots stay in ``roots_pem()`` (and so in
    every issued chain) until ``drop_old_roots``. On disk it uses Istio's plug-in CA layout
    (``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem``) plus ``trust-domain``.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        signer: _Signer,
        roots: Sequence[x509.Certificate],
        trust_domain_aliases: Sequence[str] = (),
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        clock: Clock = utc_now,
    ) -> None:
        SpiffeId(trust_domain, "ns", "sa")  # validates the trust domain's characters
        self.trust_domain = trust_domain
        # Extra trust domains this CA may sign for (lab/tests: "same root, other trust domain").
        self.trust_domain_aliases = tuple(trust_domain_aliases)
        self._signer = signer
        # The next root, trusted but not yet signing (step 1 of a hitless rotation); not saved to disk.
        self._next_signer: _Signer | None = None
        self._roots = list(roots)
        if not any(r == signer.root for r in self._roots):
            self._roots.append(signer.root)
        self._root_ttl = root_ttl
        self._clock = clock
        self._intermediate = len(signer.chain) > 0 and signer.cert != signer.root

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        intermediate: bool = False,
        trust_domain_aliases: Sequence[str] = (),
        clock: Clock = utc_now,
    ) -> LocalCa:
        """A fresh CA; ``intermediate=True`` signs leaves with an intermediate under the root."""
        signer = _make_signer(trust_domain, root_ttl, intermediate, clock())
        return cls(
            trust_domain=trust_domain,
            signer=signer,
            roots=[signer.root],
            trust_domain_aliases=trust_domain_aliases,
            root_ttl=root_ttl,
            clock=clock,
        )

    @classmethod
    def load(
        cls, directory: Path, *, trust_domain: str | None = None, clock: Clock = utc_now
    ) -> LocalCa:
        """Load a CA saved by ``save`` (or an Istio plug-in CA directory plus ``trust_domain``)."""
        directory = Path(directory)

        def read(name: str) -> bytes:
            try:
                return (directory / name).read_bytes()
            except OSError as err:
                raise CaError(f"CA directory {directory}: cannot read {name}: {err}") from None

        names: list[str] = []
        td_file = directory / "trust-domain"
        if td_file.exists():
            names = [line.strip() for line in td_file.read_text().splitlines() if line.strip()]
        if trust_domain is not None:
            names = [trust_domain, *[n for n in names if n != trust_domain]]
        if not names:
            names = [DEFAULT_TRUST_DOMAIN]
        try:
            key = serialization.load_pem_private_key(read("ca-key.pem"), password=None)
        except (ValueError, TypeError) as err:
            raise CaError(
                f"CA directory {directory}: ca-key.pem is not a PEM key ({err})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"CA directory {directory}: ca-key.pem must be an EC key")
        cert = load_pem_certificates(read("ca-cert.pem"), what=f"{directory}/ca-cert.pem")[0]
        chain = (
            load_pem_certificates(read("cert-chain.pem"), what=f"{directory}/cert-chain.pem")
            if (directory / "cert-chain.pem").exists()
            else [cert]
        )
        roots = load_pem_certificates(read("root-cert.pem"), what=f"{directory}/root-cert.pem")
        if chain[0] != cert:
            chain.insert(0, cert)
        # The signing root is the last certificate of cert-chain.pem if self-signed, else the root
        # that signed the top of the chain.
        top = chain[-1]
        if _is_self_signed(top):
            root, inner = top, tuple(chain[:-1])
        else:
            issuers = [r for r in roots if _issued_by_any(top, [r])]
            if not issuers:
                raise CaError(
                    f"CA directory {directory}: no root in root-cert.pem signs ca-cert.pem"
                )
            root, inner = issuers[0], tuple(chain)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ) != cert.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise CaError(f"CA directory {directory}: ca-key.pem does not match ca-cert.pem")
        signer = _Signer(key=key, cert=cert, chain=inner, root=root)
        return cls(
            trust_domain=names[0],
            signer=signer,
            roots=roots,
            trust_domain_aliases=names[1:],
            clock=clock,
        )

    def save(self, directory: Path) -> None:
        """Write the CA in Istio's plug-in layout; the key file is created 0600."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key_pem = _pkcs8_pem(self._signer.key)
        _write_private(directory / "ca-key.pem", key_pem)
        (directory / "ca-cert.pem").write_bytes(_pem(self._signer.cert))
        chain = [*self._signer.chain] if self._intermediate else []
        if not chain or chain[0] != self._signer.cert:
            chain.insert(0, self._signer.cert)
        if chain[-1] != self._signer.root:
            chain.append(self._signer.root)
        (directory / "cert-chain.pem").write_bytes(b"".join(_pem(c) for c in chain))
        (directory / "root-cert.pem").write_bytes(self.roots_pem())
        (directory / "trust-domain").write_text(
            "\n".join([self.trust_domain, *self.trust_domain_aliases]) + "\n"
        )

    # -- roots --------------------------------------------------------------------------------

    def roots_pem(self) -> bytes:
        """Every trusted root (current one first), concatenated PEM."""
        ordered = [self._signer.root, *[r for r in self._roots if r != self._signer.root]]
        return b"".join(_pem(r) for r in ordered)

    @property
    def root_cert(self) -> x509.Certificate:
        """The root that currently signs (directly or through the intermediate)."""
        return self._signer.root

    def prepare_root_rotation(self) -> x509.Certificate:
        """Step 1 of a hitless root rotation: make the next root and trust it, without signing with it.

        Certificates issued from now on carry both roots, so once workloads have renewed they accept
        leaves from either. Then ``rotate_root`` switches signing to it (step 2), and
        ``drop_old_roots`` ends trust in the old one (step 3). Returns the next root.
        """
        if self._next_signer is None:
            self._next_signer = _make_signer(
                self.trust_domain, self._root_ttl, self._intermediate, self._clock()
            )
            self._roots.append(self._next_signer.root)
        return self._next_signer.root

    def rotate_root(self) -> None:
        """Sign with a new root (the prepared one, else a fresh one); old roots stay trusted.

        Without ``prepare_root_rotation`` first, peers that have not renewed since do not trust the
        new root yet and refuse leaves it signed until they renew.
        """
        signer = self._next_signer or _make_signer(
            self.trust_domain, self._root_ttl, self._intermediate, self._clock()
        )
        self._next_signer = None
        self._signer = signer
        if not any(r == signer.root for r in self._roots):
            self._roots.append(signer.root)

    def drop_old_roots(self) -> None:
        """Stop trusting every root but the current one (and a prepared next one)."""
        self._roots = [self._signer.root]
        if self._next_signer is not None:
            self._roots.append(self._next_signer.root)

    # -- issuing ------------------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        not_before: datetime | None = None,
    ) -> list[bytes]:
        """Check and sign a CSR for ``identity``; return ``[leaf, *intermediates, roots]`` as PEM.

        The CSR must be correctly self-signed, carry an ECDSA P-256 key and have exactly one SAN: the
        URI of ``identity``, whose trust domain must be this CA's (or an alias).
        """
        if ttl <= timedelta(0):
            raise CsrRejected(f"TTL for {identity} must be positive, got {ttl}")
        allowed = (self.trust_domain, *self.trust_domain_aliases)
        if identity.trust_domain not in allowed:
            raise CsrRejected(
                f"identity {identity}: trust domain {identity.trust_domain!r} is not served by "
                f"this CA ({', '.join(allowed)})"
            )
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise CsrRejected(f"CSR for {identity} is not a PEM CSR ({err})") from None
        if not csr.is_signature_valid:
            raise CsrRejected(f"CSR for {identity} has an invalid signature")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CsrRejected(f"CSR for {identity} must carry an ECDSA P-256 key")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrRejected(f"CSR for {identity} has no subjectAltName") from None
        except ValueError as err:  # duplicate or malformed extensions
            raise CsrRejected(f"CSR for {identity} has malformed extensions ({err})") from None
        names = list(san)
        if names != [x509.UniformResourceIdentifier(identity.uri)]:
            raise CsrRejected(
                f"CSR SANs {[_describe(n) for n in names]} are not exactly [URI:{identity.uri}]"
            )
        return self._issue_for_key(
            public_key, [x509.UniformResourceIdentifier(identity.uri)], ttl, not_before
        )

    def issue(
        self,
        identity: SpiffeId,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        not_before: datetime | None = None,
    ) -> WorkloadCertificate:
        """Make a key, a CSR and a certificate for ``identity`` in one go (lab/tests)."""
        key_pem, csr_pem = make_csr(identity)
        chain = self.sign_csr(csr_pem, identity, ttl, not_before=not_before)
        return certificate_from_chain(identity, key_pem, chain)

    def issue_serving(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        ttl: timedelta = DEFAULT_SERVING_TTL,
        *,
        not_before: datetime | None = None,
    ) -> ServingCertificate:
        """A fresh ECDSA P-256 key and a server-auth leaf for `dns_names` (and `ip_addresses`).

        For the control plane's own gRPC endpoint, as istiod signs its DNS certificate with its CA:
        clients verify it with ``roots_pem()`` and the server name. Never carries a URI SAN, so it is
        no workload identity. Bad names raise ``ValueError`` naming the name.
        """
        if ttl <= timedelta(0):
            raise ValueError(f"serving certificate TTL must be positive, got {ttl}")
        hosts = tuple(dict.fromkeys(check_dns_name(n) for n in dns_names))
        if not hosts:
            raise ValueError("serving certificate needs at least one DNS name")
        ips: list[str] = []
        for text in ip_addresses:
            try:
                ips.append(str(ipaddress.ip_address(text.strip())))
            except ValueError:
                raise ValueError(f"serving IP {text!r} is not an IP address") from None
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
        key = _new_key()
        chain = self._issue_for_key(
            key.public_key(), names, ttl, not_before, usages=(ExtendedKeyUsageOID.SERVER_AUTH,)
        )
        leaf = x509.load_pem_x509_certificate(chain[0])
        return ServingCertificate(
            dns_names=hosts,
            ip_addresses=tuple(dict.fromkeys(ips)),
            chain_pem=b"".join(chain[:-1]),
            key_pem=_pkcs8_pem(key),
            roots_pem=chain[-1],
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
        )

    def issue_unchecked(
        self,
        names: Sequence[x509.GeneralName],
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        not_before: datetime | None = None,
        identity: SpiffeId | None = None,
    ) -> WorkloadCertificate:
        """NEGATIVE TESTS ONLY: a leaf with arbitrary SANs (several URIs, NUL, DNS-only, ...).

        No identity check is done; ``identity`` only fills the field of the returned value.
        """
        key = _new_key()
        chain = self._issue_for_key(key.public_key(), list(names), ttl, not_before)
        leaf = x509.load_pem_x509_certificate(chain[0])
        return WorkloadCertificate(
            identity=identity or SpiffeId(self.trust_domain, "invalid", "invalid"),
            chain_pem=b"".join(chain[:-1]),
            key_pem=_pkcs8_pem(key),
            roots_pem=chain[-1],
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
        )

    def _issue_for_key(
        self,
        public_key: ec.EllipticCurvePublicKey,
        names: list[x509.GeneralName],
        ttl: timedelta,
        not_before: datetime | None,
        *,
        usages: Sequence[x509.ObjectIdentifier] = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
    ) -> list[bytes]:
        start = (not_before or self._clock()).astimezone(UTC).replace(microsecond=0)
        signer = self._signer
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
                critical=False,
            )
            # Empty subject => SAN critical (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
        )
        leaf = builder.sign(signer.key, hashes.SHA256())
        intermediates = [c for c in signer.chain if c != signer.root]
        return [_pem(leaf), *[_pem(c) for c in intermediates], self.roots_pem()]


def _make_signer(
    trust_domain: str, root_ttl: timedelta, intermediate: bool, now: datetime
) -> _Signer:
    start = now.astimezone(UTC).replace(microsecond=0)
    # Istio's self-signed root carries O=<trust domain>; the serial makes rotated roots distinct.
    root_key = _new_key()
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"root {os.urandom(4).hex()}"),
        ]
    )
    root = _ca_cert(
        subject=root_name,
        key=root_key,
        issuer_cert=None,
        issuer_key=root_key,
        not_before=start,
        ttl=root_ttl,
        path_length=None,
    )
    if not intermediate:
        return _Signer(key=root_key, cert=root, chain=(), root=root)
    int_key = _new_key()
    int_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"intermediate {os.urandom(4).hex()}"),
        ]
    )
    inter = _ca_cert(
        subject=int_name,
        key=int_key,
        issuer_cert=root,
        issuer_key=root_key,
        not_before=start,
        ttl=root_ttl,
        path_length=0,
    )
    return _Signer(key=int_key, cert=inter, chain=(inter,), root=root)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _describe(name: x509.GeneralName) -> str:
    kind = type(name).__name__
    return f"{kind}:{getattr(name, 'value', name)!r}"


# --------------------------------------------------------------------------------------------------
# LocalCa behind the async CaClient interface
# --------------------------------------------------------------------------------------------------


class LocalCaClient:
    """``CaClient`` backed by a ``LocalCa``, with fault injection for tests.

    * ``down = True``: every call raises ``CaUnavailable``;
    * ``fail_next(n)``: the next ``n`` calls raise ``CaUnavailable`` (or the given exception);
    * ``gate``: an awaitable factory awaited inside each call (to hold requests in flight).
    ``calls``, ``in_flight`` and ``max_in_flight`` count what happened.
    """

    def __init__(self, ca: LocalCa, *, gate: Callable[[], Awaitable[object]] | None = None) -> None:
        self.ca = ca
        self.down = False
        self.gate = gate
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requested: list[tuple[SpiffeId, timedelta]] = []
        self._failures: list[Exception] = []

    def fail_next(self, n: int = 1, error: Exception | None = None) -> None:
        self._failures.extend(error or CaUnavailable("injected CA failure") for _ in range(n))

    async def sign(self, identity: SpiffeId, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        self.calls += 1
        self.requested.append((identity, ttl))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate()
            if self.down:
                raise CaUnavailable("local CA is down (injected)")
            if self._failures:
                raise self._failures.pop(0)
            return self.ca.sign_csr(csr_pem, identity, ttl)
        finally:
            self.in_flight -= 1


__all__ = [
    "CaClient",
    "CaError",
    "CaUnavailable",
    "ChainError",
    "CsrRejected",
    "LocalCa",
    "LocalCaClient",
    "SpiffeIdError",
    "WorkloadCertificate",
    "certificate_from_chain",
    "load_pem_certificates",
    "make_csr",
    "uri_sans",
]
