"""Istio's certificate service, server side (`istio.v1.auth.IstioCertificateService/CreateCertificate`).

Decides who may get which certificate, then hands the CSR to a pluggable signer (e.g. the project's
`LocalCa.sign_csr`). The rules are istiod's for ztunnel:
* the caller authenticates with `authorization: Bearer <token>`; a pluggable authenticator maps the
  token to a `Caller` (its own SPIFFE identity and the node it runs on) -> else UNAUTHENTICATED;
* the CSR's only SAN must be the requested SPIFFE URI (the CSR's own, or the
  `ImpersonatedIdentity` of the request metadata) -> else INVALID_ARGUMENT;
* a caller gets its own identity; another identity only if the impersonation predicate allows it
  (Istio: a pod with that identity runs on the caller's node) -> else PERMISSION_DENIED.
The checks (`parse_csr_identity`, `authorize`) are pure; `IstioCaService` is the grpc.aio shell.
"""

from __future__ import annotations

import datetime
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509

from waypoint.controlplane.grpcserve import GrpcService
from ztunnel.identity.ca import CsrRejected
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError
from ztunnel.xds import protos

log = logging.getLogger(__name__)

DEFAULT_TTL = datetime.timedelta(hours=24)  # Istio's SECRET_TTL default
MAX_TTL = datetime.timedelta(days=90)  # istiod's default max workload certificate TTL


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """An authenticated caller: its own identity and, for node agents, the node it runs on."""

    identity: SpiffeId
    node: str | None = None


class Authenticator(Protocol):
    """Maps a bearer token to its caller, or None if the token is not accepted (may be async)."""

    def __call__(self, token: str) -> Caller | Awaitable[Caller | None] | None: ...


class Signer(Protocol):
    """Signs a checked CSR; returns PEM certificates leaf first, root(s) last."""

    def sign_csr(
        self, csr_pem: bytes, identity: SpiffeId, ttl: datetime.timedelta
    ) -> list[bytes]: ...


# (caller, requested identity) -> may the caller obtain a certificate for it?
ImpersonationCheck = Callable[[Caller, SpiffeId], bool]


def no_impersonation(_caller: Caller, _identity: SpiffeId) -> bool:
    return False


def impersonation_by_node(
    identities_on_node: Callable[[str], Collection[SpiffeId]],
) -> ImpersonationCheck:
    """Istio's rule: a node agent may act for identities of pods running on its own node."""

    def check(caller: Caller, identity: SpiffeId) -> bool:
        return caller.node is not None and identity in identities_on_node(caller.node)

    return check


def static_tokens(tokens: Mapping[str, Caller]) -> Authenticator:
    """An authenticator over a fixed token table (lab and tests)."""

    def authenticate(token: str) -> Caller | None:
        return tokens.get(token)

    return authenticate


class RequestError(Exception):
    """A request the CA refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def bearer_token(metadata: Mapping[str, str]) -> str:
    value = metadata.get(protos.AUTHORIZATION_HEADER, "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing bearer token: expected 'authorization: Bearer <token>' metadata",
        )
    return token.strip()


def parse_csr_identity(csr_pem: str) -> tuple[x509.CertificateSigningRequest, SpiffeId]:
    """The CSR and its single SPIFFE URI SAN; anything else is INVALID_ARGUMENT."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as err:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"csr is not a PEM CSR: {err}"
        ) from None
    if not csr.is_signature_valid:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "csr signature is invalid")
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (x509.ExtensionNotFound, ValueError) as err:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"csr has no usable subjectAltName: {err}"
        ) from None
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"csr must carry exactly one URI SAN (a SPIFFE ID), found {len(names)} SAN(s)",
        )
    try:
        return csr, SpiffeId.parse(names[0].value)
    except SpiffeIdError as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"csr SAN: {err}") from None


def requested_identity(metadata: protos.Struct) -> SpiffeId | None:
    """The ImpersonatedIdentity of the request metadata, if any."""
    if protos.IMPERSONATED_IDENTITY_KEY not in metadata.fields:
        return None
    value = metadata.fields[protos.IMPERSONATED_IDENTITY_KEY]
    if value.WhichOneof("kind") != "string_value":
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"metadata.{protos.IMPERSONATED_IDENTITY_KEY} must be a string",
        )
    try:
        return SpiffeId.parse(value.string_value)
    except SpiffeIdError as err:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"metadata.{protos.IMPERSONATED_IDENTITY_KEY}: {err}"
        ) from None


def authorize(
    caller: Caller,
    csr_identity: SpiffeId,
    impersonated: SpiffeId | None,
    may_impersonate: ImpersonationCheck,
) -> SpiffeId:
    """The identity to sign for, or RequestError saying why the caller may not have it."""
    wanted = impersonated or csr_identity
    if csr_identity != wanted:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"csr SAN {csr_identity} is not the requested identity {wanted}",
        )
    if wanted != caller.identity and not may_impersonate(caller, wanted):
        where = f"node {caller.node!r}" if caller.node else "its node"
        raise RequestError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller {caller.identity} may not obtain a certificate for {wanted}: "
            f"no pod with that identity runs on {where}",
        )
    return wanted


def effective_ttl(
    seconds: int, default: datetime.timedelta, maximum: datetime.timedelta
) -> datetime.timedelta:
    if seconds < 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"validity_duration must not be negative: {seconds}"
        )
    if seconds == 0:
        return default
    return min(datetime.timedelta(seconds=seconds), maximum)


class IstioCaService(GrpcService):
    """CreateCertificate over grpc.aio: authenticate, check, sign."""

    _service_name = "CA server"

    def __init__(
        self,
        signer: Signer,
        authenticator: Authenticator,
        *,
        may_impersonate: ImpersonationCheck = no_impersonation,
        default_ttl: datetime.timedelta = DEFAULT_TTL,
        max_ttl: datetime.timedelta = MAX_TTL,
    ) -> None:
        self._signer = signer
        self._authenticate = authenticator
        self._may_impersonate = may_impersonate
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self.issued = 0
        self.refused = 0

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        handler = grpc.unary_unary_rpc_method_handler(
            self._create_certificate,
            request_deserializer=protos.IstioCertificateRequest.FromString,
            response_serializer=protos.IstioCertificateResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            protos.CA_SERVICE, {"CreateCertificate": handler}
        )

    async def create_certificate(
        self, request: protos.IstioCertificateRequest, metadata: Mapping[str, str]
    ) -> list[bytes]:
        """The whole decision and signing for one request; raises RequestError to refuse."""
        token = bearer_token(metadata)
        caller = self._authenticate(token)
        if inspect.isawaitable(caller):
            caller = await caller
        if caller is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "bearer token not accepted")
        _csr, csr_identity = parse_csr_identity(request.csr)
        impersonated = requested_identity(request.metadata)
        identity = authorize(caller, csr_identity, impersonated, self._may_impersonate)
        ttl = effective_ttl(request.validity_duration, self._default_ttl, self._max_ttl)
        try:
            chain = self._signer.sign_csr(request.csr.encode(), identity, ttl)
        except CsrRejected as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except Exception as err:
            log.exception("ca: signing %s failed", identity)
            raise RequestError(grpc.StatusCode.INTERNAL, f"signing failed: {err}") from None
        return chain

    async def _create_certificate(
        self, request: protos.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> protos.IstioCertificateResponse:
        metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
        try:
            chain = await self.create_certificate(request, metadata)
        except RequestError as err:
            self.refused += 1
            log.info("ca: refused request from %s: %s", context.peer(), err)
            await context.abort(err.code, str(err))
            raise AssertionError("unreachable: abort raises") from None
        self.issued += 1
        return protos.IstioCertificateResponse(cert_chain=[pem.decode() for pem in chain])
