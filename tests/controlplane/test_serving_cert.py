"""The control plane's self-issued serving certificate: issuance, flags, TLS over real gRPC, renewal."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from e2e.fakekube import FakeApiServer, TokenReviewResult, pod_token_user
from tests.controlplane import objects as o
from waypoint.controlplane import cli
from waypoint.manager.client import connect
from ztunnel.identity.ca import CaUnavailable, LocalCa, certificate_from_chain, make_csr
from ztunnel.identity.istio_ca import IstioCaClient
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.xds.client import XdsClient, XdsClientConfig, tls_credentials
from ztunnel.xds.session import NodeInfo

pytestmark = pytest.mark.timeout(30)

TD = "cluster.local"
NAME = "ambient-controlplane.ambient-system.svc"
ALICE = SpiffeId(TD, "shop", "alice")
TOKENS = {
    "tok-alice": pod_token_user(
        namespace="shop",
        service_account="alice",
        pod_name="alice-1",
        pod_uid="uid-shop-alice-1",
        node_name="node-a",
        audiences=("istio-ca",),
    )
}


def _reviewer(token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
    return TOKENS.get(token) or TokenReviewResult(authenticated=False, error="invalid token")


class _Ignore:
    def on_resources(self, type_url, added, removed):
        return {}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(list(argv))
    cli.check_arguments(parser, args)
    return args


# --- issuance (pure) -----------------------------------------------------------------------------


def test_serving_cert_has_dns_and_ip_sans_server_auth_and_chains_to_the_root() -> None:
    ca = LocalCa.generate(TD, intermediate=True)
    cert = ca.issue_serving([NAME, "Extra.Example.", NAME], ["127.0.0.1", "::1"])
    assert cert.dns_names == (NAME, "extra.example")
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME, "extra.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # no workload identity
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.roots_pem == ca.roots_pem()
    assert cert.not_after - cert.not_before == datetime.timedelta(hours=24)
    assert "PRIVATE" not in repr(cert)
    # SPIFFE issuance is unchanged: client and server auth.
    spiffe = x509.load_pem_x509_certificate(ca.issue(ALICE).chain_pem)
    assert len(list(spiffe.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)) == 2


@pytest.mark.parametrize(
    ("dns", "ips", "message"),
    [
        ([], [], "at least one DNS name"),
        (["*.svc"], [], "label '\\*' is not a RFC 1123"),
        (["bad_name.svc"], [], "'bad_name.svc'"),
        ([NAME], ["10.0.0.300"], "serving IP '10.0.0.300'"),
    ],
)
def test_serving_cert_refuses_bad_names(dns: list[str], ips: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalCa.generate(TD).issue_serving(dns, ips)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--serving-dns-names", "a.svc,bad name"], "--serving-dns-names: DNS name 'bad name'"),
        (["--serving-dns-names", " , "], "--serving-dns-names: no DNS name given"),
        (["--serving-ip", "nope"], "--serving-ip 'nope': not an IP address"),
        (["--serving-cert-ttl", "1"], "--serving-cert-ttl 1.0: must be at least 2 seconds"),
        (
            ["--plaintext", "--tls-cert-chain", "/c", "--tls-key", "/k"],
            "--plaintext and --tls-cert-chain/--tls-key exclude each other",
        ),
    ],
)
def test_serving_flags_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)
    assert message in capsys.readouterr().err


def test_serving_flag_defaults() -> None:
    args = _args()
    assert cli.serving_names(args) == (
        [NAME, "ambient-controlplane.ambient-system.svc.cluster.local"],
        [],
    )
    assert args.plaintext is False


# --- over real gRPC --------------------------------------------------------------------------------


@dataclass
class _Running:
    port: int
    roots: bytes
    status: cli.RunStatus
    tmp: Path


@pytest.fixture
async def manager(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[_Running]:
    extra: list[str] = getattr(request, "param", [])
    server = FakeApiServer(token_reviewer=_reviewer)
    await server.start()
    for ns in ("shop", "istio-system"):
        server.put_object(o.namespace(ns))
    server.put_object(o.pod("alice-1", "shop", node="node-a", sa="alice", ip="10.1.0.8"))
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
    api = await connect(kubeconfig)
    raw = await cli.api_client(kubeconfig)
    ca = LocalCa.generate(TD)
    ca.save(tmp_path / "ca")
    stop = asyncio.Event()
    status = cli.RunStatus()
    args = _args(
        "--xds-address",
        "127.0.0.1:0",
        "--no-leader-elect",
        "--ca-dir",
        str(tmp_path / "ca"),
        "--mesh-trust-domain",
        TD,
        *extra,
    )
    task = asyncio.create_task(cli.run(args, api, raw, stop, status=status))
    try:
        await asyncio.wait_for(status.serving.wait(), 10)
        assert status.port is not None
        assert status.roots is not None
        yield _Running(status.port, status.roots(), status, tmp_path)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await raw.close()
        await api.close()
        await server.stop()


def _xds(port: int, root: bytes, server_name: str) -> XdsClient:
    return XdsClient(
        XdsClientConfig(
            address=f"127.0.0.1:{port}",
            node=NodeInfo(pod_name="z", namespace="istio-system"),
            credentials=tls_credentials(root),
            server_name=server_name,
            connect_timeout=1.0,
        ),
        _Ignore(),
    )


async def _xds_ready(port: int, root: bytes, server_name: str, timeout: float = 5) -> bool:
    client = _xds(port, root, server_name)
    task = asyncio.create_task(client.run())
    try:
        await client.wait_ready(timeout=timeout)
        return True
    except TimeoutError:
        return False
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)


async def _sign(port: int, root: bytes, server_name: str, tmp: Path) -> None:
    token = tmp / "token"
    token.write_text("tok-alice")
    client = IstioCaClient(
        f"127.0.0.1:{port}",
        credentials=tls_credentials(root),
        server_name=server_name,
        token_path=token,
        impersonate=False,
        timeout=3.0,
        connect_timeout=1.0,
    )
    key_pem, csr_pem = make_csr(ALICE)
    try:
        chain = await client.sign(ALICE, csr_pem, datetime.timedelta(hours=1))
    finally:
        await client.close()
    assert certificate_from_chain(ALICE, key_pem, chain).identity == ALICE


def _presented_serial(port: int, root: bytes) -> int:
    # A plain TLS handshake (ALPN h2, as gRPC) to see which certificate the server presents now.
    ctx = ssl.create_default_context(cadata=root.decode())
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=3) as sock,
        ctx.wrap_socket(sock, server_hostname=NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_xds_and_ca_clients_verify_root_and_server_name(manager: _Running) -> None:
    assert manager.status.serving_cert is not None
    assert await _xds_ready(manager.port, manager.roots, NAME)
    assert await _xds_ready(manager.port, manager.roots, f"{NAME}.cluster.local")
    await _sign(manager.port, manager.roots, NAME, manager.tmp)


@pytest.mark.parametrize("wrong", ["root", "server-name"])
async def test_wrong_root_or_server_name_is_refused(manager: _Running, wrong: str) -> None:
    root = LocalCa.generate(TD).roots_pem() if wrong == "root" else manager.roots
    name = "istiod.istio-system.svc" if wrong == "server-name" else NAME
    assert not await _xds_ready(manager.port, root, name, timeout=1.5)
    with pytest.raises(CaUnavailable):
        await _sign(manager.port, root, name, manager.tmp)


@pytest.mark.parametrize("manager", [["--serving-cert-ttl", "2"]], indirect=True)
async def test_renewal_swaps_the_certificate_and_keeps_clients_working(
    manager: _Running,
) -> None:
    rotator = manager.status.serving_cert
    assert rotator is not None
    first = await asyncio.to_thread(_presented_serial, manager.port, manager.roots)
    assert first == rotator.current.serial
    held = _xds(manager.port, manager.roots, NAME)  # one stream held across the renewals
    held_task = asyncio.create_task(held.run())
    try:
        await held.wait_ready(timeout=5)
        async with asyncio.timeout(8):
            while rotator.renewals < 2:
                await asyncio.sleep(0.05)
        serial = await asyncio.to_thread(_presented_serial, manager.port, manager.roots)
        assert serial != first  # new handshakes see a renewed certificate
        assert await _xds_ready(manager.port, manager.roots, NAME)
        await _sign(manager.port, manager.roots, NAME, manager.tmp)
        assert held.connected
        assert held.connections == 1
    finally:
        await held.close()
        await asyncio.wait_for(held_task, 5)


@pytest.mark.parametrize("manager", [["--plaintext"]], indirect=True)
async def test_plaintext_flag_keeps_serving_without_tls(manager: _Running) -> None:
    assert manager.status.serving_cert is None
    client = XdsClient(
        XdsClientConfig(
            address=f"127.0.0.1:{manager.port}",
            node=NodeInfo(pod_name="z", namespace="istio-system"),
        ),
        _Ignore(),
    )
    task = asyncio.create_task(client.run())
    try:
        await client.wait_ready(timeout=5)
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)
