"""Process wiring of the manager as control plane: flags, connections, leader-gated waypoint controller.

Owns `add_arguments(parser)` / `check_arguments(parser, args)` (the control-plane flags, which
`waypoint manager` includes), `run(args, ...)` (start the control plane: watches -> xDS on
`--xds-address`, the Istio CA on the same gRPC port, over TLS; run the waypoint controller only while this
replica holds the Lease; report what runs through a `RunStatus`) and `main()`
(`python -m waypoint.controlplane.cli`, the control plane alone, without the waypoint controller).
`waypoint manager` (waypoint/cli.py) passes its `WatchCache` in so the controller and the control
plane share one watch per kind. Decisions live elsewhere.

Serving TLS: with `--tls-cert-chain/--tls-key` the given files; else, with a CA (`--ca-dir`), a
short-lived ECDSA P-256 certificate for `--serving-dns-names`/`--serving-ip` that the process
issues itself from that CA (as istiod does for its DNS certificate), so clients verify it with the
published root (istio-ca-root-cert) and the server name. `ServingCertRotator` renews it at
half-life and hot-swaps it through gRPC's dynamic server credentials: new handshakes get the new
certificate, established xDS streams and the server's state stay untouched (no listener restart).
`--plaintext` (or no CA directory: an in-memory CA whose root nobody mounts) serves plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from waypoint.controlplane.authn import (
    DEFAULT_TRUSTED_NODE_ACCOUNTS,
    TokenReviewAuthenticator,
    format_node_accounts,
    parse_node_accounts,
)
from waypoint.controlplane.ca_server import IstioCaService
from waypoint.controlplane.leader import LeaderElector
from waypoint.controlplane.service import ControlPlane, ControlPlaneConfig
from waypoint.controlplane.translate import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_ROOT_NAMESPACE,
    TranslateConfig,
)
from waypoint.manager.controller import WatchCache
from waypoint.manager.kube import KubeApi
from ztunnel.config import DEFAULT_TRUST_DOMAIN
from ztunnel.identity.ca import LocalCa, ServingCertificate, check_dns_name, utc_now

log = logging.getLogger("waypoint.controlplane")

# Something with start()/stop(): the waypoint controller (waypoint.manager.controller.WaypointManager).
Startable = Callable[[], Coroutine[Any, Any, None]]

# The Service of deploy/controlplane/service.yaml, short and fully qualified (ztunnels dial the
# short name; ALT_XDS_HOSTNAME may pick either).
DEFAULT_SERVING_DNS_NAMES = (
    "ambient-controlplane.ambient-system.svc,ambient-controlplane.ambient-system.svc.cluster.local"
)
DEFAULT_SERVING_TTL_SECONDS = 24 * 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The control-plane flags (defaults from the environment the Deployment sets)."""
    env = os.environ.get
    g = parser.add_argument_group("control plane")
    g.add_argument(
        "--xds-address",
        default=env("XDS_LISTEN_ADDRESS", "0.0.0.0:15012"),
        help="gRPC listen address for delta xDS and the CA ('' disables the control plane)",
    )
    g.add_argument(
        "--tls-cert-chain", type=Path, default=None, help="serving certificate chain PEM"
    )
    g.add_argument("--tls-key", type=Path, default=None, help="serving private key PEM")
    g.add_argument(
        "--plaintext",
        action="store_true",
        help="serve xDS and the CA without TLS (tests, labs); default: TLS",
    )
    g.add_argument(
        "--serving-dns-names",
        default=env("SERVING_DNS_NAMES", DEFAULT_SERVING_DNS_NAMES),
        help="DNS SANs (comma-separated) of the serving certificate issued from --ca-dir",
    )
    g.add_argument(
        "--serving-ip",
        action="append",
        default=[],
        help="an IP SAN of the issued serving certificate (repeatable)",
    )
    g.add_argument(
        "--serving-cert-ttl",
        type=float,
        default=DEFAULT_SERVING_TTL_SECONDS,
        help="lifetime in seconds of the issued serving certificate (renewed at half-life)",
    )
    g.add_argument(
        "--ca-dir",
        type=Path,
        default=Path(os.environ["CA_DIR"]) if os.environ.get("CA_DIR") else None,
        help="CA directory (ca-cert.pem, ca-key.pem, root-cert.pem); default: an in-memory CA",
    )
    g.add_argument("--cluster-id", default=env("CLUSTER_ID", DEFAULT_CLUSTER_ID))
    g.add_argument("--mesh-trust-domain", default=env("TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN))
    g.add_argument("--mesh-cluster-domain", default=env("CLUSTER_DOMAIN", "cluster.local"))
    g.add_argument("--root-namespace", default=env("ROOT_NAMESPACE", DEFAULT_ROOT_NAMESPACE))
    g.add_argument(
        "--trusted-node-accounts",
        default=env(
            "CA_TRUSTED_NODE_ACCOUNTS", format_node_accounts(DEFAULT_TRUSTED_NODE_ACCOUNTS)
        ),
        help="node agents (ns/sa, comma-separated) that may obtain identities of pods on their "
        "node; everyone else gets only its own identity",
    )
    g.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gate the waypoint controller's writes on a Lease (several replicas)",
    )
    g.add_argument("--lease-namespace", default=env("POD_NAMESPACE", DEFAULT_ROOT_NAMESPACE))
    g.add_argument("--lease-name", default="waypoint-manager")
    g.add_argument(
        "--identity", default=env("POD_NAME") or socket.gethostname(), help="leader identity"
    )
    # client-go's defaults; tests shorten them to see a handover quickly.
    g.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        help="seconds a standby waits after the last renewal before taking the Lease",
    )
    g.add_argument(
        "--renew-deadline",
        type=float,
        default=10.0,
        help="seconds the leader keeps trying to renew before it steps down",
    )
    g.add_argument(
        "--retry-period", type=float, default=2.0, help="seconds between election attempts"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations `run` cannot honour (exits through `parser.error`)."""
    if (args.tls_cert_chain is None) != (args.tls_key is None):
        parser.error("--tls-cert-chain and --tls-key go together")
    if getattr(args, "plaintext", False) and args.tls_cert_chain is not None:
        parser.error("--plaintext and --tls-cert-chain/--tls-key exclude each other")
    try:
        serving_names(args)
    except ValueError as err:
        parser.error(str(err))
    if getattr(args, "serving_cert_ttl", DEFAULT_SERVING_TTL_SECONDS) < 2:
        parser.error(f"--serving-cert-ttl {args.serving_cert_ttl}: must be at least 2 seconds")
    try:
        parse_node_accounts(args.trusted_node_accounts)
    except ValueError as err:
        parser.error(str(err))
    if args.leader_elect:
        if args.lease_duration < 1:
            parser.error(f"--lease-duration {args.lease_duration}: must be at least 1 second")
        if not 0 < args.renew_deadline < args.lease_duration:
            parser.error(
                f"--renew-deadline {args.renew_deadline}: must be between 0 and "
                f"--lease-duration {args.lease_duration}"
            )
        if not 0 < args.retry_period < args.renew_deadline:
            parser.error(
                f"--retry-period {args.retry_period}: must be between 0 and "
                f"--renew-deadline {args.renew_deadline}"
            )
        if not args.identity:
            parser.error("--identity: empty (set POD_NAME or pass --identity)")


@dataclass(slots=True)
class RunStatus:
    """What `run` has started, for health/metrics and tests; filled in as things come up."""

    plane: ControlPlane | None = None
    ca: IstioCaService | None = None
    port: int | None = None
    """The bound xDS/CA port (None: not serving, e.g. `--xds-address ''`)."""
    elector: LeaderElector | None = None
    roots: Callable[[], bytes] | None = None
    """The CA's current trusted roots (PEM), once the CA is loaded; published by the manager."""
    serving_cert: ServingCertRotator | None = None
    """The self-issued serving certificate (None: plaintext or --tls-cert-chain files)."""
    controller_running: bool = False
    """True between the controller's start and stop (always, without leader election)."""
    serving: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def is_leader(self) -> bool:
        return self.controller_running


async def api_client(kubeconfig: str | None, context: str | None = None) -> k8s.ApiClient:
    """A raw kubernetes_asyncio client (TokenReview, Leases) from a kubeconfig or in-cluster."""
    configuration = k8s.Configuration()
    if kubeconfig:
        await k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return k8s.ApiClient(configuration)


def serving_names(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The checked DNS and IP SANs of the issued serving certificate; ValueError names the flag."""
    text = getattr(args, "serving_dns_names", DEFAULT_SERVING_DNS_NAMES)
    dns: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        try:
            dns.append(check_dns_name(name))
        except ValueError as err:
            raise ValueError(f"--serving-dns-names: {err}") from None
    if not dns:
        raise ValueError("--serving-dns-names: no DNS name given")
    ips: list[str] = []
    for ip in getattr(args, "serving_ip", []) or []:
        try:
            ips.append(str(ipaddress.ip_address(ip.strip())))
        except ValueError:
            raise ValueError(f"--serving-ip {ip!r}: not an IP address") from None
    return dns, ips


class ServingCertRotator:
    """The control plane's own serving certificate, issued from its CA and renewed at half-life.

    `credentials()` are gRPC dynamic server credentials: gRPC asks `_fetch` at each new TLS
    handshake, and gets the renewed certificate once after each renewal (None otherwise, meaning
    "keep the current one"). Swapping credentials instead of restarting the listener keeps the
    server, its xDS sessions and their pushed state; open streams keep their old (still valid)
    certificate until they reconnect.
    """

    def __init__(
        self,
        ca: LocalCa,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        *,
        ttl: timedelta = timedelta(seconds=DEFAULT_SERVING_TTL_SECONDS),
    ) -> None:
        self._ca = ca
        self._dns = list(dns_names)
        self._ips = list(ip_addresses)
        self._ttl = ttl
        self.current: ServingCertificate = self._issue()
        self.renewals = 0
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # _fetch runs on gRPC core threads

    def _issue(self) -> ServingCertificate:
        cert = self._ca.issue_serving(self._dns, self._ips, self._ttl)
        log.info("serving certificate %r issued", cert)
        return cert

    @staticmethod
    def _config(cert: ServingCertificate) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(cert.key_pem, cert.chain_pem)])

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config(self.current), self._fetch)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core (any thread) before a handshake: hand over a renewal exactly once.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def renew(self) -> ServingCertificate:
        """Issue a new certificate now; handshakes from now on present it."""
        cert = self._issue()
        config = self._config(cert)
        with self._lock:
            self.current = cert
            self._pending = config
        self.renewals += 1
        return cert

    async def run(self, stop: asyncio.Event, *, retry: float = 5.0) -> None:
        """Renew at each half-life until `stop` is set (failures retried every `retry` s)."""
        while not stop.is_set():
            delay = max(0.0, (self.current.refresh_at() - utc_now()).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
                return
            try:
                self.renew()
            except Exception:  # keep serving the old certificate; try again soon
                log.exception("serving certificate renewal failed; retrying in %.0fs", retry)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry)


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if args.tls_cert_chain is None and args.tls_key is None:
        return None
    if args.tls_cert_chain is None or args.tls_key is None:
        raise SystemExit("--tls-cert-chain and --tls-key go together")
    try:
        chain, key = args.tls_cert_chain.read_bytes(), args.tls_key.read_bytes()
    except OSError as err:
        raise SystemExit(f"cannot read serving certificate: {err}") from None
    return grpc.ssl_server_credentials([(key, chain)])


async def run(
    args: argparse.Namespace,
    api: KubeApi,
    raw: k8s.ApiClient,
    stop: asyncio.Event,
    *,
    start_controller: Startable | None = None,
    stop_controller: Startable | None = None,
    on_serving: Callable[[ControlPlane, int], None] | None = None,
    cache: WatchCache | None = None,
    status: RunStatus | None = None,
) -> None:
    """Run the control plane until `stop` is set; the controller runs only while leader.

    `start_controller`/`stop_controller` are e.g. a `WaypointManager`'s start and stop;
    `on_serving(plane, port)` is called once xDS and the CA accept connections. `cache` is the
    process's shared watch cache (owned by the caller); `status` is filled in as things start.
    """
    status = status if status is not None else RunStatus()
    plane: ControlPlane | None = None
    controller_task: asyncio.Task[None] | None = None
    rotator_task: asyncio.Task[None] | None = None

    async def started() -> None:
        nonlocal controller_task
        status.controller_running = True
        if start_controller is not None:
            # In a task: the controller's first sync must not hold up Lease renewals.
            controller_task = asyncio.create_task(start_controller(), name="waypoint-controller")

    async def stopped() -> None:
        nonlocal controller_task
        status.controller_running = False
        task, controller_task = controller_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if stop_controller is not None:
            await stop_controller()

    elector_task: asyncio.Task[None] | None = None
    try:
        if args.xds_address:
            plane = ControlPlane(
                api,
                ControlPlaneConfig(
                    translate=TranslateConfig(
                        cluster_id=args.cluster_id,
                        cluster_domain=args.mesh_cluster_domain,
                        trust_domain=args.mesh_trust_domain,
                        root_namespace=args.root_namespace,
                    )
                ),
                cache=cache,
            )
            status.plane = plane
            # The CA and the serving certificate are read before any watch starts: a bad CA
            # directory fails the process at once, with the file it could not use.
            if args.ca_dir is not None:
                ca = LocalCa.load(args.ca_dir, trust_domain=args.mesh_trust_domain)
            else:
                log.warning(
                    "no --ca-dir: certificates are signed by an in-memory CA (tests and labs only)"
                )
                ca = LocalCa.generate(args.mesh_trust_domain)
            status.roots = ca.roots_pem
            credentials = _server_credentials(args)
            plaintext = bool(getattr(args, "plaintext", False))
            if credentials is None and args.ca_dir is not None and not plaintext:
                dns, ips = serving_names(args)
                ttl = getattr(args, "serving_cert_ttl", DEFAULT_SERVING_TTL_SECONDS)
                status.serving_cert = ServingCertRotator(ca, dns, ips, ttl=timedelta(seconds=ttl))
                credentials = status.serving_cert.credentials()
            await plane.start()
            authenticator = TokenReviewAuthenticator(
                raw,
                plane.pod,
                trust_domain=args.mesh_trust_domain,
                trusted_node_accounts=parse_node_accounts(
                    getattr(
                        args,
                        "trusted_node_accounts",
                        format_node_accounts(DEFAULT_TRUSTED_NODE_ACCOUNTS),
                    )
                ),
            )
            if credentials is None:
                log.warning(
                    "xDS and CA served in plaintext (%s)",
                    "--plaintext" if plaintext else "no --ca-dir and no --tls-cert-chain",
                )
            status.ca = plane.ca_service(ca, authenticator)
            port = await plane.serve(args.xds_address, ca=status.ca, credentials=credentials)
            status.port = port
            if status.serving_cert is not None:
                rotator_task = asyncio.create_task(
                    status.serving_cert.run(stop), name="serving-cert-renewal"
                )
            log.info("control plane serving xDS and CA on port %d", port)
            status.serving.set()
            if on_serving is not None:
                on_serving(plane, port)
        if start_controller is not None:
            if args.leader_elect:
                elector = LeaderElector(
                    raw,
                    namespace=args.lease_namespace,
                    name=args.lease_name,
                    identity=args.identity,
                    lease_duration=getattr(args, "lease_duration", 15),
                    renew_deadline=getattr(args, "renew_deadline", 10.0),
                    retry_period=getattr(args, "retry_period", 2.0),
                    on_started=started,
                    on_stopped=stopped,
                )
                status.elector = elector
                elector_task = asyncio.create_task(elector.run(), name="leader-election")
            else:
                await started()
        await stop.wait()
    finally:
        if rotator_task is not None:
            rotator_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rotator_task
        if elector_task is not None:
            # Cancelling the elector stops the controller (on_stopped) and releases the Lease,
            # so a standby takes over without waiting for it to expire.
            elector_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await elector_task
        else:
            await stopped()
        if plane is not None:
            await plane.stop()


async def _main(args: argparse.Namespace) -> int:
    from waypoint.manager.client import connect

    api = await connect(args.kubeconfig, context=args.context)
    raw = await api_client(args.kubeconfig, args.context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await run(args, api, raw, stop)
    finally:
        await raw.close()
        await api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone control plane (no waypoint controller): `python -m waypoint.controlplane.cli`."""
    parser = argparse.ArgumentParser(prog="waypoint-controlplane", description=__doc__)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)
    parser.add_argument("--context", default=None)
    parser.add_argument("--log-level", default="INFO")
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
