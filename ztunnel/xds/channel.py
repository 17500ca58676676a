"""gRPC channel plumbing shared by the xDS and CA clients: credentials, options, auth metadata.

Istio's ztunnel authenticates to istiod (xDS and CA alike) with `authorization: Bearer <token>` read
from a projected service-account token file, plus a `clusterid` header; the token is read again for
every connection because kubelet rotates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc

from ztunnel.xds import protos

MAX_MESSAGE_BYTES: Final = 200 * 1024 * 1024  # ztunnel's max decode size


class XdsError(Exception):
    """A problem reaching or talking to the control plane; the message says which server and why."""


def tls_credentials(
    root_pem: bytes, *, cert_chain_pem: bytes | None = None, key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting `root_pem` (optionally with a client certificate)."""
    return grpc.ssl_channel_credentials(
        root_certificates=root_pem, private_key=key_pem, certificate_chain=cert_chain_pem
    )


def read_token(path: Path) -> str:
    """The bearer token in `path`, stripped; errors name the file."""
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise XdsError(f"cannot read token file {path}: {err.strerror or err}") from None
    if not token:
        raise XdsError(f"token file {path} is empty")
    return token


def auth_metadata(
    token_path: Path | None, cluster_id: str, extra: Sequence[tuple[str, str]] = ()
) -> tuple[tuple[str, str], ...]:
    """gRPC metadata as ztunnel sends it: bearer token and cluster id, then extra headers."""
    headers: list[tuple[str, str]] = []
    if token_path is not None:
        headers.append((protos.AUTHORIZATION_HEADER, f"Bearer {read_token(token_path)}"))
        headers.append((protos.CLUSTER_ID_HEADER, cluster_id))
    headers.extend((k.lower(), v) for k, v in extra)
    return tuple(headers)


def channel_options(
    *, server_name: str | None, connect_timeout: float, keepalive: float, keepalive_timeout: float
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
        # In gRPC core the minimum reconnect backoff is also the connect deadline.
        ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000)),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, Any]],
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
