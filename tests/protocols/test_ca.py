"""Istio certificate service over real gRPC on 127.0.0.1: IstioCaClient against IstioCaService."""

from __future__ import annotations

import datetime
import socket

import grpc
import pytest
from cryptography import x509

from waypoint.controlplane.ca_server import (
    Caller,
    IstioCaService,
    impersonation_by_node,
    static_tokens,
)
from ztunnel.identity.ca import (
    CaUnavailable,
    CsrRejected,
    LocalCa,
    certificate_from_chain,
    make_csr,
)
from ztunnel.identity.istio_ca import IstioCaClient
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.xds.client import tls_credentials

TD = "cluster.local"
ZTUNNEL_N1 = SpiffeId(TD, "istio-system", "ztunnel")
APP = SpiffeId(TD, "default", "app")
OTHER = SpiffeId(TD, "default", "other")
# Pods per node, as a Kubernetes watch would maintain it.
PODS = {"n1": {APP}, "n2": {OTHER}}
TOKENS = {
    "tok-n1": Caller(identity=ZTUNNEL_N1, node="n1"),
    "tok-n2": Caller(identity=ZTUNNEL_N1, node="n2"),
    "tok-app": Caller(identity=APP),
}
DAY = datetime.timedelta(hours=24)


@pytest.fixture(scope="module")
def local_ca():
    return LocalCa.generate(TD)


@pytest.fixture
async def ca_running(local_ca):
    service = IstioCaService(
        local_ca,
        static_tokens(TOKENS),
        may_impersonate=impersonation_by_node(lambda node: PODS.get(node, set())),
    )
    port = await service.start("127.0.0.1:0")
    try:
        yield service, port
    finally:
        await service.stop(0)


@pytest.fixture
def make_client(tmp_path):
    clients: list[IstioCaClient] = []

    def make(port: int, token: str | None, **kw) -> IstioCaClient:
        path = None
        if token is not None:
            path = tmp_path / f"token-{len(clients)}"
            path.write_text(token)
        client = IstioCaClient(f"127.0.0.1:{port}", token_path=path, **kw)
        clients.append(client)
        return client

    return make


async def test_issuance_with_impersonation(ca_running, make_client):
    ca_service, ca_port = ca_running
    client = make_client(ca_port, "tok-n1")
    key_pem, csr_pem = make_csr(APP)
    try:
        chain = await client.sign(APP, csr_pem, DAY)
    finally:
        await client.close()
    cert = certificate_from_chain(APP, key_pem, chain)  # leaf is APP, our key, chains to the root
    assert cert.identity == APP
    leaf = x509.load_pem_x509_certificate(chain[0])
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert abs(lifetime - DAY) < datetime.timedelta(minutes=10)
    assert ca_service.issued == 1


async def test_own_identity_without_impersonation(ca_running, make_client):
    _, ca_port = ca_running
    client = make_client(ca_port, "tok-app", impersonate=False)
    _, csr_pem = make_csr(APP)
    try:
        chain = await client.sign(APP, csr_pem, DAY)
    finally:
        await client.close()
    assert b"BEGIN CERTIFICATE" in chain[0]


@pytest.mark.parametrize(
    ("token", "identity", "csr_for", "code", "reason"),
    [
        ("tok-n2", APP, APP, "PERMISSION_DENIED", "no pod with that identity runs on node 'n2'"),
        ("tok-app", OTHER, OTHER, "PERMISSION_DENIED", "may not obtain a certificate"),
        ("nope", APP, APP, "UNAUTHENTICATED", "bearer token not accepted"),
        (None, APP, APP, "UNAUTHENTICATED", "missing bearer token"),
        ("tok-n1", APP, OTHER, "INVALID_ARGUMENT", "is not the requested identity"),
    ],
    ids=[
        "token-of-another-node",
        "app-asks-for-other",
        "unknown-token",
        "no-token",
        "csr-san-mismatch",
    ],
)
async def test_refusals(ca_running, make_client, token, identity, csr_for, code, reason):
    ca_service, ca_port = ca_running
    client = make_client(ca_port, token)
    _, csr_pem = make_csr(csr_for)
    try:
        with pytest.raises(CsrRejected) as info:
            await client.sign(identity, csr_pem, DAY)
    finally:
        await client.close()
    assert code in str(info.value)
    assert reason in str(info.value)
    assert ca_service.issued == 0


async def test_ca_down_surfaces_cleanly(make_client):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(port, "tok-n1", timeout=2.0)
    _, csr_pem = make_csr(APP)
    try:
        with pytest.raises(CaUnavailable, match=rf"CA 127.0.0.1:{port} did not sign .*UNAVAILABLE"):
            await client.sign(APP, csr_pem, DAY)
    finally:
        await client.close()


async def test_unreadable_token_file_is_named(ca_running, tmp_path):
    _, ca_port = ca_running
    missing = tmp_path / "no-such-token"
    client = IstioCaClient(f"127.0.0.1:{ca_port}", token_path=missing)
    with pytest.raises(CaUnavailable, match="no-such-token"):
        await client.sign(APP, make_csr(APP)[1], DAY)


async def test_tls_channel(local_ca, make_client):
    server_cert = local_ca.issue_unchecked([x509.DNSName("istiod.istio-system.svc")])
    service = IstioCaService(local_ca, static_tokens(TOKENS))
    credentials = grpc.ssl_server_credentials([(server_cert.key_pem, server_cert.chain_pem)])
    port = await service.start("127.0.0.1:0", credentials)
    try:
        client = make_client(
            port,
            "tok-app",
            impersonate=False,
            credentials=tls_credentials(local_ca.roots_pem()),
            server_name="istiod.istio-system.svc",
        )
        try:
            chain = await client.sign(APP, make_csr(APP)[1], DAY)
        finally:
            await client.close()
        assert len(chain) >= 2
    finally:
        await service.stop(0)
