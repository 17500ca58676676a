"""Certificates over real gRPC through their life: renewal, root rotation, and a CA outage.

CertificateManager + IstioCaClient against IstioCaService on 127.0.0.1, with real time and short TTLs:
a certificate is renewed at half-life, a rotated root shows up in the renewed chain while the old root
stays trusted, and while the CA is down the valid certificate keeps serving TLS handshakes; once the CA
is back, renewal resumes.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl

import pytest

from waypoint.controlplane.ca_server import Caller, IstioCaService, static_tokens
from ztunnel.identity import tls
from ztunnel.identity.ca import LocalCa, WorkloadCertificate, load_pem_certificates
from ztunnel.identity.istio_ca import IstioCaClient
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId

TD = "cluster.local"
APP = SpiffeId(TD, "default", "app")
TTL = datetime.timedelta(seconds=4)


async def _start_ca(ca: LocalCa, port: int = 0) -> tuple[IstioCaService, int]:
    service = IstioCaService(ca, static_tokens({"tok-app": Caller(identity=APP)}))
    bound = await service.start(f"127.0.0.1:{port}")
    return service, bound


def _manager(port: int, token_path) -> tuple[CertificateManager, IstioCaClient]:
    client = IstioCaClient(f"127.0.0.1:{port}", token_path=token_path, impersonate=False, timeout=2)
    manager = CertificateManager(
        client, ttl=TTL, initial_backoff=0.05, max_backoff=0.2, request_timeout=2.0
    )
    return manager, client


async def _next_cert(manager: CertificateManager, after: int, timeout: float = 6.0):
    """Wait until the manager holds a certificate with a serial other than ``after``."""
    arrived: asyncio.Queue[WorkloadCertificate] = asyncio.Queue()
    unsubscribe = manager.subscribe(arrived.put_nowait)
    try:
        async with asyncio.timeout(timeout):
            while True:
                cert = await arrived.get()
                if cert.identity == APP and cert.serial != after:
                    return cert
    finally:
        unsubscribe()


async def _handshake(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> SpiffeId:
    """One mutual TLS handshake on loopback; returns the identity the client verified."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls.server_context(server_cert))
    port = server.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(client_cert), server_hostname=None
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        peer = tls.verify_server_identity(ssl_object, [server_cert.identity])
        writer.write(b"x")
        writer.close()
        return peer
    finally:
        server.close()
        await server.wait_closed()


async def test_renewal_and_root_rotation_over_grpc(tmp_path):
    ca = LocalCa.generate(TD)
    token = tmp_path / "token"
    token.write_text("tok-app")
    service, port = await _start_ca(ca)
    manager, client = _manager(port, token)
    try:
        first = await manager.get(APP)
        assert first.not_after - first.not_before <= TTL
        old_root = ca.root_cert
        # Step 1: trust the next root; the next renewal carries both roots, still signed by the old.
        next_root = ca.prepare_root_rotation()
        trusting_both = await _next_cert(manager, after=first.serial)
        assert set(load_pem_certificates(trusting_both.roots_pem, what="roots")) >= {
            old_root,
            next_root,
        }
        # Step 2: sign with the new root; the renewal chains to it and still trusts the old one.
        ca.rotate_root()
        assert ca.root_cert == next_root
        renewed = await _next_cert(manager, after=trusting_both.serial)
        roots = load_pem_certificates(renewed.roots_pem, what="roots")
        assert old_root in roots, "the old root stays trusted after rotation"
        assert next_root in roots
        # A peer that renewed only once (old-root leaf, both roots trusted) and one with the
        # new-root leaf accept each other in both directions.
        assert await _handshake(renewed, trusting_both) == APP
        assert await _handshake(trusting_both, renewed) == APP
        # Without step 1, a peer holding only the old root refuses the new-root leaf.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _handshake(renewed, first)
    finally:
        await manager.close()
        await client.close()
        await service.stop(0)


async def test_valid_certificate_keeps_working_while_the_ca_is_down(tmp_path):
    ca = LocalCa.generate(TD)
    token = tmp_path / "token"
    token.write_text("tok-app")
    service, port = await _start_ca(ca)
    manager, client = _manager(port, token)
    try:
        held = await manager.get(APP)
        await service.stop(0)
        # The CA is gone: renewal attempts fail, but until expiry the certificate keeps serving.
        await asyncio.sleep(0.5)
        still = await manager.get(APP)
        assert still.serial == held.serial
        assert still.is_valid(datetime.datetime.now(datetime.UTC))
        assert await _handshake(still, still) == APP
        # The CA comes back on the same port: renewal resumes with a fresh certificate.
        service, _ = await _start_ca(ca, port)
        renewed = await _next_cert(manager, after=held.serial)
        assert renewed.not_after > held.not_after
    finally:
        await manager.close()
        await client.close()
        await service.stop(0)
