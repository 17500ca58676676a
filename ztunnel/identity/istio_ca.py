"""CA client for Istio's certificate service (`istio.v1.auth.IstioCertificateService/CreateCertificate`).

Implements the project's CA-client protocol (`ztunnel.identity.ca.CaClient`: `sign(identity, csr_pem,
ttl) -> [leaf, ..., root]` PEM list) against istiod or any compatible CA, as Istio's ztunnel does:
the CSR PEM and requested validity in seconds; in shared (node) mode the metadata Struct
`{"ImpersonatedIdentity": "<spiffe id>"}`, since ztunnel authenticates with its own token and asks
for the identities of pods on its node; `authorization: Bearer <token>` from the token file and a
`clusterid` header. Like ztunnel it re-checks that the returned leaf is for the requested identity.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from ztunnel.identity.ca import CaError, CaUnavailable, CsrRejected
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.xds import protos
from ztunnel.xds.channel import XdsError, auth_metadata, channel_options, open_channel

_PEM_CERT = "-----BEGIN CERTIFICATE-----"


class IstioCaError(CaError):
    """The CA answered something unusable or failed otherwise; the message says which CA and why.

    Unreachable CAs raise `CaUnavailable` and refusals of the request `CsrRejected` (both CaError).
    """


# gRPC outcomes that mean "try again later" rather than "this request is wrong".
_UNAVAILABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"})
_REJECTED = frozenset({"INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED"})


class IstioCaClient:
    """Signs CSRs through an Istio-compatible CA over gRPC (plaintext or TLS)."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        token_path: Path | None = None,
        cluster_id: str = "Kubernetes",
        impersonate: bool = True,
        extra_headers: tuple[tuple[str, str], ...] = (),
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._address = address
        self._credentials = credentials
        self._token_path = token_path
        self._cluster_id = cluster_id
        self._impersonate = impersonate
        self._extra_headers = extra_headers
        self._timeout = timeout
        self._options = channel_options(
            server_name=server_name,
            connect_timeout=connect_timeout,
            keepalive=30.0,
            keepalive_timeout=10.0,
        )
        self._channel: grpc.aio.Channel | None = None
        self._rpc: Any = None

    async def sign(
        self, identity: SpiffeId, csr_pem: bytes, ttl: datetime.timedelta
    ) -> list[bytes]:
        """Have the CA sign `csr_pem` for `identity`; returns PEM certificates leaf first, root last.

        Raises CaUnavailable (unreachable, timeout, token unreadable), CsrRejected (the CA refused:
        bad CSR, not authenticated, not allowed) or IstioCaError (unusable answer).
        """
        seconds = int(ttl.total_seconds())
        if seconds <= 0:
            raise ValueError(f"certificate TTL must be positive, got {ttl}")
        try:
            csr_text = csr_pem.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"CSR for {identity} is not ASCII PEM") from None
        request = protos.IstioCertificateRequest(csr=csr_text, validity_duration=seconds)
        if self._impersonate:
            request.metadata.update({protos.IMPERSONATED_IDENTITY_KEY: identity.uri})
        try:
            metadata = auth_metadata(self._token_path, self._cluster_id, self._extra_headers)
        except XdsError as err:
            raise CaUnavailable(f"cannot authenticate to CA {self._address}: {err}") from None
        try:
            response = await self._call()(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            message = f"CA {self._address} did not sign {identity}: {code}: {err.details()}"
            if code in _UNAVAILABLE:
                raise CaUnavailable(message) from None
            if code in _REJECTED:
                raise CsrRejected(message) from None
            raise IstioCaError(message) from None
        return _check_chain(identity, list(response.cert_chain), self._address)

    async def close(self) -> None:
        channel, self._channel, self._rpc = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _call(self) -> Any:
        # One channel for the client's life: gRPC reconnects it on its own.
        if self._rpc is None:
            self._channel = open_channel(self._address, self._credentials, self._options)
            self._rpc = self._channel.unary_unary(
                protos.CREATE_CERTIFICATE_METHOD,
                request_serializer=protos.IstioCertificateRequest.SerializeToString,
                response_deserializer=protos.IstioCertificateResponse.FromString,
            )
        return self._rpc


def _check_chain(identity: SpiffeId, chain: list[str], address: str) -> list[bytes]:
    """Reject empty chains, non-PEM entries and a leaf that is not for `identity`."""
    if not chain:
        raise IstioCaError(f"CA {address} returned an empty certificate chain for {identity}")
    for index, pem in enumerate(chain):
        if _PEM_CERT not in pem:
            raise IstioCaError(
                f"CA {address}: cert_chain[{index}] for {identity} is not a PEM certificate"
            )
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound) as err:
        raise IstioCaError(
            f"CA {address}: unusable leaf certificate for {identity}: {err}"
        ) from None
    if uris != [identity.uri]:
        raise IstioCaError(
            f"CA {address} returned a certificate for {uris} instead of {identity.uri}"
        )
    return [pem.encode() for pem in chain]
