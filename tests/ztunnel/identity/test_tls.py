"""HBONE TLS over real loopback sockets: mutual SPIFFE checks, TLS 1.3 only, ALPN h2, bad SANs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ztunnel.identity import tls
from ztunnel.identity.ca import LocalCa, WorkloadCertificate
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

TD = "cluster.local"
SERVER = SpiffeId(TD, "prod", "server")
CLIENT = SpiffeId(TD, "prod", "client")
OTHER = SpiffeId(TD, "prod", "impostor")
FOREIGN = SpiffeId("evil.example", "prod", "client")
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def ca() -> LocalCa:
    return LocalCa.generate(TD, trust_domain_aliases=["evil.example"])


@dataclass
class Observed:
    """What the test server saw on each accepted connection."""

    identities: list[SpiffeId] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    alpn: list[str | None] = field(default_factory=list)
    app_bytes: int = 0
    handled: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def hbone_server(cert: WorkloadCertificate) -> AsyncIterator[tuple[int, Observed]]:
    seen = Observed()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.handled += 1
        try:
            so = writer.get_extra_info("ssl_object")
            seen.alpn.append(tls.negotiated_alpn(so))
            try:
                peer = tls.verify_client_identity(so, cert.identity.trust_domain)
            except tls.PeerIdentityError as err:
                seen.errors.append(err.reason)
                return
            seen.identities.append(peer)
            writer.write(b"hello " + str(peer).encode())
            await writer.drain()
            # Count every application byte the client sends until it closes.
            while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
                seen.app_bytes += len(chunk)
        except (ConnectionError, ssl.SSLError) as err:
            seen.errors.append(repr(err))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            seen.done.set()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=tls.server_context(cert), ssl_handshake_timeout=TIMEOUT
    )
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None), TIMEOUT
    )


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


async def connect_and_read(port: int, ctx: ssl.SSLContext) -> None:
    """Connect and read; raise if the server rejects us (alert, reset or EOF)."""
    reader, writer = await connect(port, ctx)
    try:
        if not await asyncio.wait_for(reader.read(100), TIMEOUT):
            raise asyncio.IncompleteReadError(b"", 1)
    finally:
        await close(writer)


async def test_mutual_handshake_sees_identities_both_ways(ca: LocalCa) -> None:
    async with hbone_server(ca.issue(SERVER)) as (port, seen):
        reader, writer = await connect(port, tls.client_context(ca.issue(CLIENT)))
        so = writer.get_extra_info("ssl_object")
        assert tls.verify_server_identity(so, [SERVER]) == SERVER
        assert so.version() == "TLSv1.3"
        assert so.selected_alpn_protocol() == "h2"
        assert so.cipher()[0] == "TLS_AES_256_GCM_SHA384"
        assert await asyncio.wait_for(reader.read(100), TIMEOUT) == b"hello " + CLIENT.uri.encode()
        writer.write(b"12345")
        await writer.drain()
        await close(writer)
        await asyncio.wait_for(seen.done.wait(), TIMEOUT)
    assert seen.identities == [CLIENT]
    assert seen.alpn == ["h2"]
    assert seen.app_bytes == 5


async def test_service_san_in_expected_set_is_accepted(ca: LocalCa) -> None:
    async with hbone_server(ca.issue(SERVER)) as (port, _):
        _, writer = await connect(port, tls.client_context(ca.issue(CLIENT)))
        so = writer.get_extra_info("ssl_object")
        assert tls.verify_server_identity(so, {OTHER, SERVER}) == SERVER
        with pytest.raises(tls.PeerIdentityError, match="no expected identity"):
            tls.verify_server_identity(so, [])
        await close(writer)


async def test_client_rejects_wrong_server_identity_before_sending(ca: LocalCa) -> None:
    async with hbone_server(ca.issue(OTHER)) as (port, seen):
        _, writer = await connect(port, tls.client_context(ca.issue(CLIENT)))
        with pytest.raises(tls.PeerIdentityError, match="not the expected one"):
            tls.verify_server_identity(writer.get_extra_info("ssl_object"), [SERVER])
        await close(writer)  # as a caller must: close without writing
        await asyncio.wait_for(seen.done.wait(), TIMEOUT)
    assert seen.app_bytes == 0


async def test_server_rejects_client_from_other_trust_domain(ca: LocalCa) -> None:
    async with hbone_server(ca.issue(SERVER)) as (port, seen):
        reader, writer = await connect(port, tls.client_context(ca.issue(FOREIGN)))
        tls.verify_server_identity(writer.get_extra_info("ssl_object"), [SERVER])
        # The server closes without a byte of application data.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(100), TIMEOUT) == b""
        await close(writer)
        await asyncio.wait_for(seen.done.wait(), TIMEOUT)
    assert seen.identities == []
    assert len(seen.errors) == 1
    assert "trust domain 'evil.example'" in seen.errors[0]


async def test_server_rejects_client_without_certificate(ca: LocalCa) -> None:
    server_cert = ca.issue(SERVER)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.check_hostname = False
    bare.load_verify_locations(cadata=server_cert.roots_pem.decode())
    bare.set_alpn_protocols(["h2"])
    async with hbone_server(server_cert) as (port, seen):
        # TLS 1.3: the client finishes first, then learns of the rejection (alert or EOF).
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await connect_and_read(port, bare)
    assert seen.handled == 0  # never reached application code


async def test_tls12_only_client_is_refused(ca: LocalCa) -> None:
    client = ca.issue(CLIENT)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with tls._key_file(client.chain_pem + client.key_pem) as path:
        old.load_cert_chain(path)
    async with hbone_server(ca.issue(SERVER)) as (port, seen):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await connect_and_read(port, old)
    assert seen.handled == 0


async def test_tls13_only_client_refuses_tls12_server(ca: LocalCa) -> None:
    server = ca.issue(SERVER)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls._key_file(server.chain_pem + server.key_pem) as path:
        old.load_cert_chain(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=old)
    try:
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await connect(port, tls.client_context(ca.issue(CLIENT)))
    finally:
        srv.close()
        await srv.wait_closed()


async def test_client_rejects_server_from_unknown_ca(ca: LocalCa) -> None:
    stranger = LocalCa.generate(TD)
    async with hbone_server(stranger.issue(SERVER)) as (port, seen):
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(port, tls.client_context(ca.issue(CLIENT)))
    assert seen.app_bytes == 0


@pytest.mark.parametrize(
    "when",
    [timedelta(days=-2), timedelta(days=2)],
    ids=["expired", "not yet valid"],
)
async def test_client_rejects_server_certificate_outside_validity(
    ca: LocalCa, when: timedelta
) -> None:
    bad = ca.issue(SERVER, timedelta(hours=1), not_before=datetime.now(UTC) + when)
    async with hbone_server(bad) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(port, tls.client_context(ca.issue(CLIENT)))


async def test_client_rejects_server_with_two_uri_sans(ca: LocalCa) -> None:
    bad = ca.issue_unchecked(
        [x509.UniformResourceIdentifier(SERVER.uri), x509.UniformResourceIdentifier(OTHER.uri)],
        identity=SERVER,
    )
    async with hbone_server(bad) as (port, seen):
        _, writer = await connect(port, tls.client_context(ca.issue(CLIENT)))
        with pytest.raises(tls.PeerIdentityError, match="2 URI SANs"):
            tls.verify_server_identity(writer.get_extra_info("ssl_object"), [SERVER])
        await close(writer)
        await asyncio.wait_for(seen.done.wait(), TIMEOUT)
    assert seen.app_bytes == 0


# -- peer_identity on crafted certificates (no handshake needed) ----------------------------------


class FakeSsl:
    def __init__(self, cert: WorkloadCertificate | None) -> None:
        leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0] if cert else None
        self._der = leaf.public_bytes(Encoding.DER) if leaf else None

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self._der


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            [
                x509.UniformResourceIdentifier(SERVER.uri),
                x509.UniformResourceIdentifier(OTHER.uri),
            ],
            "2 URI SANs",
        ),
        ([x509.UniformResourceIdentifier(SERVER.uri + "\x00.evil")], "NUL or non-printable"),
        ([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a\x07/sa/b")], "non-printable"),
        ([x509.UniformResourceIdentifier("https://cluster.local/ns/a/sa/b")], "not a valid SPIFFE"),
        ([x509.UniformResourceIdentifier(SERVER.uri + "/extra")], "not a valid SPIFFE"),
        (
            [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/A/sa/b")],
            "not a valid SPIFFE",
        ),
        ([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a%2F/sa/b")], "percent"),
        ([x509.DNSName("server.prod.svc.cluster.local")], "no URI SAN"),
    ],
    ids=[
        "two URI SANs",
        "NUL",
        "control char",
        "non-spiffe URI",
        "extra segment",
        "upper case",
        "percent-encoded",
        "DNS SAN only",
    ],
)
def test_peer_identity_rejects_bad_sans(ca: LocalCa, names, message: str) -> None:
    bad = ca.issue_unchecked(names)
    with pytest.raises(tls.PeerIdentityError, match=message):
        tls.peer_identity(FakeSsl(bad))  # type: ignore[arg-type]


def test_peer_identity_ignores_dns_sans_next_to_the_spiffe_id(ca: LocalCa) -> None:
    cert = ca.issue_unchecked(
        [x509.DNSName("server.example"), x509.UniformResourceIdentifier(SERVER.uri)]
    )
    assert tls.peer_identity(FakeSsl(cert)) == SERVER  # type: ignore[arg-type]


def test_peer_identity_without_certificate() -> None:
    with pytest.raises(tls.PeerIdentityError, match="no certificate"):
        tls.peer_identity(FakeSsl(None))  # type: ignore[arg-type]


def test_context_is_cached_per_certificate(ca: LocalCa) -> None:
    first, second = ca.issue(CLIENT), ca.issue(CLIENT)
    assert tls.client_context(first) is tls.client_context(first)
    assert tls.server_context(first) is tls.server_context(first)
    assert tls.client_context(first) is not tls.client_context(second)
    assert tls.server_context(first) is not tls.client_context(first)


def test_context_settings(ca: LocalCa) -> None:
    cert = ca.issue(SERVER)
    for ctx in (tls.server_context(cert), tls.client_context(cert)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        assert ctx.options & ssl.OP_NO_TICKET


def test_no_key_material_left_on_disk(ca: LocalCa) -> None:
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    tls.server_context(ca.issue(SERVER))
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {n for n in after - before if n.startswith("hbone-")}


def test_bad_key_is_a_clear_error(ca: LocalCa) -> None:
    good = ca.issue(SERVER)
    other = ca.issue(OTHER)
    mixed = WorkloadCertificate(
        identity=good.identity,
        chain_pem=good.chain_pem,
        key_pem=other.key_pem,
        roots_pem=good.roots_pem,
        not_before=good.not_before,
        not_after=good.not_after,
        serial=good.serial,
    )
    with pytest.raises(ValueError, match="cannot be loaded"):
        tls.server_context(mixed)


async def test_server_rejects_expired_client_certificate(ca: LocalCa) -> None:
    expired = ca.issue(CLIENT, timedelta(hours=1), not_before=datetime.now(UTC) - timedelta(days=1))
    async with hbone_server(ca.issue(SERVER)) as (port, seen):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await connect_and_read(port, tls.client_context(expired))
    assert seen.handled == 0


async def test_client_rejects_chain_through_non_ca_intermediate(ca: LocalCa) -> None:
    # A leaf (CA:false) used to sign another leaf must not be accepted as an intermediate.
    signer = ca.issue(OTHER)
    signer_key = serialization.load_pem_private_key(signer.key_pem, password=None)
    signer_leaf = x509.load_pem_x509_certificates(signer.chain_pem)[0]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer_leaf.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SERVER.uri)]), critical=True
        )
        .sign(signer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    bad = WorkloadCertificate(
        identity=SERVER,
        chain_pem=forged.public_bytes(Encoding.PEM) + signer.chain_pem,
        key_pem=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        roots_pem=signer.roots_pem,
        not_before=forged.not_valid_before_utc,
        not_after=forged.not_valid_after_utc,
        serial=forged.serial_number,
    )
    async with hbone_server(bad) as (port, seen):
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(port, tls.client_context(ca.issue(CLIENT)))
    assert seen.app_bytes == 0


async def test_client_without_h2_alpn_gets_no_alpn(ca: LocalCa) -> None:
    # Python's server ignores a non-overlapping ALPN offer; the HBONE server must check for "h2".
    client = ca.issue(CLIENT)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=client.roots_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    with tls._key_file(client.chain_pem + client.key_pem) as path:
        ctx.load_cert_chain(path)
    async with hbone_server(ca.issue(SERVER)) as (port, seen):
        _, writer = await connect(port, ctx)
        assert tls.negotiated_alpn(writer.get_extra_info("ssl_object")) is None
        await close(writer)
        await asyncio.wait_for(seen.done.wait(), TIMEOUT)
    assert seen.alpn == [None]


_URI_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=80)


@settings(max_examples=60)
@example(uri=SERVER.uri)
@example(uri=SERVER.uri + "\x00")
@given(uri=st.one_of(_URI_TEXT, _URI_TEXT.map(lambda s: "spiffe://" + s)))
def test_peer_identity_accepts_exactly_what_spiffe_parse_accepts(ca: LocalCa, uri: str) -> None:
    try:
        cert = ca.issue_unchecked([x509.UniformResourceIdentifier(uri)])
    except ValueError:
        return  # cryptography refuses to encode it; nothing to check
    try:
        expected: SpiffeId | None = SpiffeId.parse(uri)
    except SpiffeIdError:
        expected = None
    if expected is None:
        with pytest.raises(tls.PeerIdentityError):
            tls.peer_identity(FakeSsl(cert))  # type: ignore[arg-type]
    else:
        assert tls.peer_identity(FakeSsl(cert)) == expected  # type: ignore[arg-type]
