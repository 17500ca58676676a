"""Identity matrix at the HBONE level over real TLS (reliability.md §7 test 14).

Each bad client certificate (two URI SANs, non-SPIFFE URI, DNS-only, NUL in the SAN, malformed SPIFFE
path, expired, not yet valid, wrong trust domain, unknown CA, none at all) tries a full HBONE CONNECT:
the connection must be refused in the handshake or the identity check, with 0 bytes from the server,
0 ``on_connect`` calls and 0 upstream dials. Headers claiming another identity (``Forwarded``,
``baggage``, XFCC) never change the principal the callback and the tunnel stats see.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from hyperframe.frame import RstStreamFrame

from tests.ztunnel.proxy.hbone_fixtures import CLIENT_ID, TD
from tests.ztunnel.proxy.test_attacks_kit import (
    PREFACE,
    Attacker,
    legit_roundtrip,
    make_attack_lab,
    wait_for,
)
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import ALPN_H2, client_context

URI = x509.UniformResourceIdentifier
SPIFFE = f"spiffe://{TD}/ns/ns-a/sa/sa-client"


def _sans(*names):
    return lambda lab: lab.ca.issue_unchecked(list(names))


def _expired(lab):
    return lab.ca.issue(
        CLIENT_ID, ttl=timedelta(hours=1), not_before=datetime.now(UTC) - timedelta(hours=2)
    )


def _not_yet_valid(lab):
    return lab.ca.issue(
        CLIENT_ID, ttl=timedelta(hours=1), not_before=datetime.now(UTC) + timedelta(hours=1)
    )


def _unknown_ca(lab):
    return LocalCa.generate(TD).issue(CLIENT_ID)


def _other_trust_domain_ca(lab):
    return LocalCa.generate("evil.local").issue(SpiffeId("evil.local", "ns-a", "sa-client"))


CASES = {
    "two-uri-sans": _sans(URI(SPIFFE), URI(f"spiffe://{TD}/ns/ns-x/sa/admin")),
    "non-spiffe-uri": _sans(URI("https://ns-a.example/sa-client")),
    "dns-only": _sans(x509.DNSName("sa-client.ns-a.svc.cluster.local")),
    "nul-in-san": _sans(URI(SPIFFE + "\x00.evil")),
    "extra-path": _sans(URI(SPIFFE + "/extra")),
    "upper-case-scheme": _sans(URI(SPIFFE.replace("spiffe", "SPIFFE"))),
    "wrong-trust-domain-same-ca": _sans(URI("spiffe://evil.local/ns/ns-a/sa/sa-client")),
    "wrong-trust-domain-own-ca": _other_trust_domain_ca,
    "expired": _expired,
    "not-yet-valid": _not_yet_valid,
    "unknown-ca": _unknown_ca,
}


async def _attempt(lab, ctx: ssl.SSLContext) -> bytes:
    """Full TLS + HBONE CONNECT attempt; returns every byte the server sent (plaintext)."""
    got = b""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", lab.port, ssl=ctx, server_hostname=""), 5
        )
    except (ConnectionError, OSError, ssl.SSLError, TimeoutError):
        return got
    try:
        att = Attacker(reader, writer)
        att.send_raw(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        att.open_stream(lab.echo_authority)
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.drain(), 3)
            # A refused peer sees EOF at once; an accepted one gets SETTINGS + 200, then quiet.
            while data := await asyncio.wait_for(reader.read(65536), 0.5):
                got += data
    finally:
        writer.transport.abort()
    return got


def _ctx_without_cert(lab) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.load_verify_locations(cadata=lab.certs[CLIENT_ID].roots_pem.decode())
    return ctx


@pytest.mark.parametrize("make", [*CASES.values(), None], ids=[*CASES, "no-client-cert"])
async def test_bad_client_identity_refused_without_dial(make):
    lab = await make_attack_lab()
    try:
        if make is None:
            ctx = _ctx_without_cert(lab)
        else:
            cert = make(lab)
            # The unknown-CA / other-CA certs carry their own roots; the client must still
            # trust our server, so its context trusts both.
            ctx = client_context(cert)
            ctx.load_verify_locations(cadata=lab.certs[CLIENT_ID].roots_pem.decode())
        got = await _attempt(lab, ctx)
        assert got == b"", f"server sent {len(got)} application bytes to a bad identity"
        await wait_for(lambda: lab.server.handshake_failures == 1, 3, "handshake failure counted")
        assert lab.calls == 0
        assert lab.dials == 0
        assert lab.sentinel.opened == 0
        assert lab.server.connections_open == 0
        await legit_roundtrip(lab)  # positive control on the same server
    finally:
        await lab.close()


SPOOFS = [
    ("forwarded", 'for="10.9.9.9";by="spiffe://cluster.local/ns/istio-system/sa/admin"'),
    ("baggage", "k8s.namespace.name=istio-system,k8s.deployment.name=admin,service.name=admin"),
    (
        "x-forwarded-client-cert",
        "By=spiffe://cluster.local/ns/x/sa/y;URI=spiffe://cluster.local/ns/istio-system/sa/admin",
    ),
    ("x-istio-peer-identity", "spiffe://cluster.local/ns/istio-system/sa/admin"),
]


async def test_valid_identity_control_gets_through():
    """The harness itself works: the same attempt with the real client certificate is served."""
    lab = await make_attack_lab()
    try:
        got = await _attempt(lab, client_context(lab.certs[CLIENT_ID]))
        assert got  # SETTINGS and the 200
        assert lab.calls == 1
        assert lab.requests[0].peer_identity == CLIENT_ID
        assert lab.server.handshake_failures == 0
    finally:
        await lab.close()


async def test_identity_headers_never_change_the_principal():
    lab = await make_attack_lab()
    try:
        att = await Attacker.connect(lab)
        sids = [att.open_stream(lab.echo_authority, [spoof]) for spoof in SPOOFS]
        sids.append(att.open_stream(lab.echo_authority, SPOOFS))
        await att.drain()
        assert await att.until(lambda a: set(sids) <= a.statuses().keys(), 5)
        assert len(lab.requests) == len(sids)
        for request in lab.requests:
            assert request.peer_identity == CLIENT_ID
            assert any(request.header(name) for name, _ in SPOOFS)  # passed on, never trusted
        for sid in sids:
            att.send(RstStreamFrame(sid, error_code=0x8))
        await att.drain()
        await wait_for(lambda: len(lab.stats) == len(sids), 3, "tunnel stats")
        assert {s.peer_identity for s in lab.stats} == {CLIENT_ID}
    finally:
        await lab.close()
