"""LocalCa, CSRs and chain checks: only the URI SAN, P-256, TTL, CSR refusal, root rotation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztunnel.identity.ca import (
    CaUnavailable,
    ChainError,
    CsrRejected,
    LocalCa,
    LocalCaClient,
    WorkloadCertificate,
    certificate_from_chain,
    make_csr,
)
from ztunnel.identity.spiffe import SpiffeId

ALICE = SpiffeId("cluster.local", "default", "alice")
BOB = SpiffeId("cluster.local", "default", "bob")
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> LocalCa:
    return LocalCa.generate(clock=lambda: NOW)


def leaf_of(cert: WorkloadCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(cert.chain_pem)[0]


def verifies_with(leaf: x509.Certificate, roots_pem: bytes, chain_pem: bytes = b"") -> bool:
    """Walk leaf -> intermediates -> any root, by signature."""
    path = [leaf, *x509.load_pem_x509_certificates(chain_pem)[1:]] if chain_pem else [leaf]
    roots = x509.load_pem_x509_certificates(roots_pem)
    for child, parent in pairwise(path):
        child.verify_directly_issued_by(parent)
    for root in roots:
        try:
            path[-1].verify_directly_issued_by(root)
        except Exception:
            continue
        return True
    return False


def test_csr_has_only_the_uri_san_and_a_p256_key() -> None:
    key_pem, csr_pem = make_csr(ALICE)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ALICE.uri)]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8


def test_issued_leaf_has_only_the_uri_san_p256_and_usages(ca: LocalCa) -> None:
    cert = ca.issue(ALICE)
    leaf = leaf_of(cert)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ALICE.uri)]
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256R1)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment
    assert not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.identity == ALICE
    assert cert.serial == leaf.serial_number
    assert verifies_with(leaf, cert.roots_pem)


@pytest.mark.parametrize(
    "ttl", [timedelta(hours=24), timedelta(minutes=1), timedelta(days=7)], ids=["24h", "1m", "7d"]
)
def test_ttl_is_respected(ca: LocalCa, ttl: timedelta) -> None:
    cert = ca.issue(ALICE, ttl)
    assert cert.not_before == NOW
    assert cert.not_after - cert.not_before == ttl
    assert cert.refresh_at() == NOW + ttl / 2
    assert cert.is_valid(NOW)
    assert not cert.is_valid(NOW - timedelta(seconds=1))
    assert not cert.is_valid(NOW + ttl)


def test_default_ttl_is_24_hours(ca: LocalCa) -> None:
    cert = ca.issue(ALICE)
    assert cert.not_after - cert.not_before == timedelta(hours=24)


def test_repr_hides_the_key(ca: LocalCa) -> None:
    cert = ca.issue(ALICE)
    assert b"PRIVATE" not in repr(cert).encode()
    assert "alice" in repr(cert)


def _csr_with(names: list[x509.GeneralName], key: object | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("csr_factory", "message"),
    [
        (lambda: make_csr(BOB)[1], "not exactly"),
        (
            lambda: _csr_with(
                [
                    x509.UniformResourceIdentifier(ALICE.uri),
                    x509.UniformResourceIdentifier(BOB.uri),
                ]
            ),
            "not exactly",
        ),
        (
            lambda: _csr_with(
                [x509.UniformResourceIdentifier(ALICE.uri), x509.DNSName("alice.example")]
            ),
            "not exactly",
        ),
        (lambda: _csr_with([]), "no subjectAltName"),
        (
            lambda: _csr_with(
                [x509.UniformResourceIdentifier(ALICE.uri)],
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ),
            "P-256",
        ),
        (lambda: b"not a csr", "not a PEM CSR"),
    ],
    ids=["other identity", "two URIs", "extra DNS SAN", "no SAN", "RSA key", "garbage"],
)
def test_bad_csr_is_refused(ca: LocalCa, csr_factory, message: str) -> None:
    with pytest.raises(CsrRejected, match=message):
        ca.sign_csr(csr_factory(), ALICE)


def test_csr_with_bad_signature_is_refused(ca: LocalCa) -> None:
    _, csr_pem = make_csr(ALICE)
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    import base64

    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CsrRejected):
        ca.sign_csr(pem, ALICE)


def test_foreign_trust_domain_refused_unless_alias() -> None:
    other = SpiffeId("other.domain", "default", "alice")
    plain = LocalCa.generate()
    with pytest.raises(CsrRejected, match="trust domain"):
        plain.issue(other)
    aliased = LocalCa.generate(trust_domain_aliases=["other.domain"])
    assert aliased.issue(other).identity == other


def test_root_rotation_trusts_both_then_only_new(ca: LocalCa) -> None:
    rotating = LocalCa.generate(clock=lambda: NOW)
    old_root = rotating.roots_pem()
    before = rotating.issue(ALICE)
    rotating.rotate_root()
    after = rotating.issue(ALICE)
    combined = rotating.roots_pem()
    assert combined.count(b"BEGIN CERTIFICATE") == 2
    assert after.roots_pem == combined  # issued chains carry every trusted root
    # New leaf verifies with the combined roots, not with the old root alone; old leaf still trusted.
    assert verifies_with(leaf_of(after), combined)
    assert not verifies_with(leaf_of(after), old_root)
    assert verifies_with(leaf_of(before), combined)
    rotating.drop_old_roots()
    only_new = rotating.roots_pem()
    assert only_new.count(b"BEGIN CERTIFICATE") == 1
    assert verifies_with(leaf_of(after), only_new)
    assert not verifies_with(leaf_of(before), only_new)


def test_intermediate_chain() -> None:
    ca = LocalCa.generate(intermediate=True, clock=lambda: NOW)
    cert = ca.issue(ALICE)
    assert cert.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    assert cert.roots_pem.count(b"BEGIN CERTIFICATE") == 1
    assert verifies_with(leaf_of(cert), cert.roots_pem, cert.chain_pem)
    ca.rotate_root()
    assert ca.issue(ALICE).roots_pem.count(b"BEGIN CERTIFICATE") == 2


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    ca = LocalCa.generate("example.org", intermediate=True, trust_domain_aliases=["alias.org"])
    ca.rotate_root()
    ca.save(tmp_path)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    loaded = LocalCa.load(tmp_path)
    assert loaded.trust_domain == "example.org"
    assert loaded.trust_domain_aliases == ("alias.org",)
    assert loaded.roots_pem() == ca.roots_pem()
    cert = loaded.issue(SpiffeId("example.org", "ns", "sa"))
    assert verifies_with(leaf_of(cert), ca.roots_pem(), cert.chain_pem)
    loaded.drop_old_roots()
    assert loaded.roots_pem().count(b"BEGIN CERTIFICATE") == 1


def test_load_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"ca-key\.pem"):
        LocalCa.load(tmp_path)


def test_chain_check_rejects_wrong_identity_and_wrong_key(ca: LocalCa) -> None:
    key_pem, csr_pem = make_csr(ALICE)
    chain = ca.sign_csr(csr_pem, ALICE)
    assert certificate_from_chain(ALICE, key_pem, chain).identity == ALICE
    with pytest.raises(ChainError, match="URI SANs"):
        certificate_from_chain(BOB, key_pem, chain)
    other_key, _ = make_csr(ALICE)
    with pytest.raises(ChainError, match="private key"):
        certificate_from_chain(ALICE, other_key, chain)
    with pytest.raises(ChainError, match="at least one root"):
        certificate_from_chain(ALICE, key_pem, chain[:1])
    stranger = LocalCa.generate()
    with pytest.raises(ChainError, match="not signed"):
        certificate_from_chain(ALICE, key_pem, [chain[0], stranger.roots_pem()])


def test_chain_with_roots_as_separate_trailing_elements(ca: LocalCa) -> None:
    rotating = LocalCa.generate(clock=lambda: NOW)
    rotating.rotate_root()
    key_pem, csr_pem = make_csr(ALICE)
    leaf, roots = rotating.sign_csr(csr_pem, ALICE)
    split = [
        r.public_bytes(serialization.Encoding.PEM) for r in x509.load_pem_x509_certificates(roots)
    ]
    cert = certificate_from_chain(ALICE, key_pem, [leaf, *split])
    assert cert.roots_pem.count(b"BEGIN CERTIFICATE") == 2
    assert cert.chain_pem == leaf


async def test_local_ca_client_faults(ca: LocalCa) -> None:
    client = LocalCaClient(ca)
    key_pem, csr_pem = make_csr(ALICE)
    chain = await client.sign(ALICE, csr_pem, timedelta(hours=1))
    assert certificate_from_chain(ALICE, key_pem, chain).identity == ALICE
    client.fail_next(2)
    for _ in range(2):
        with pytest.raises(CaUnavailable):
            await client.sign(ALICE, csr_pem, timedelta(hours=1))
    await client.sign(ALICE, csr_pem, timedelta(hours=1))
    client.down = True
    with pytest.raises(CaUnavailable, match="down"):
        await client.sign(ALICE, csr_pem, timedelta(hours=1))
    assert client.calls == 5
    assert client.in_flight == 0
