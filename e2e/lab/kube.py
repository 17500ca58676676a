"""Kubernetes mode of the lab: a control plane on the fabric, the lab's pods as API objects, kubelet.

Owns what a cluster would provide around our data plane, so ztunnel runs exactly as in a cluster
(``ztunnel run`` with ``XDS_ADDRESS`` and no config file):

* a control-plane netns ``<prefix>-cp`` on the fabric bridge (``10.240.0.250``), reachable from every
  node and pod (routes to every node's pod CIDR via that node); in it the fake API server
  (``e2e.fakekube``, served from a thread of the lab process that
  entered that netns, so the lab reads and writes objects directly) and ``waypoint manager``
  (xDS and the Istio CA on 15012, signing with the lab's CA directory, monitoring on 15014);
* the lab's pods mirrored as Pod objects (nodeName, podIP, phase Running, Ready, service account,
  labels), their Namespaces (unlabelled unless asked: the test labels them ``ambient``),
  ServiceAccounts, Services (the spec's VIPs as ClusterIPs) with EndpointSlices;
* one Pod per node for its ztunnel (``ambient-system/ztunnel-<node>``, service account ``ztunnel``,
  the node agent account the manager is told to trust)
  and a token file per node; the API server's TokenReview maps each token to that pod, bound to
  its node, which is how the CA learns which identities a ztunnel may obtain;
* the kubelet (and the Deployment/ReplicaSet controllers) for waypoints: ``run_deployment(ns, name)``
  waits for the Deployment the manager rendered for a Gateway, creates its ReplicaSet and one Pod
  per waypoint replica the spec declared (the Deployment's pod labels, the ReplicaSet as owner,
  ``nodeName``, ``podIP``, Running/Ready), and starts ``waypoint proxy`` in each replica's netns
  (not captured) exactly as the container says: its command and args, its env with the downward
  API resolved from that Pod, the projected ``istio-ca`` token as a file whose TokenReview says
  "this pod's service account", and the in-cluster control-plane address resolved to the lab's
  (the lab's "cluster DNS"; TLS, verified with the lab CA's root and the manager's IP SAN); then
  reports ``readyReplicas`` on the Deployment;
* the kubelet's health-probe path: ``probe(pod, port)`` connects from the node netns with the source
  SNATed to ``169.254.7.127`` (the host rule istio-cni installs: ``nat POSTROUTING -m owner
  --socket-exists -j SNAT``), which the in-pod rules exempt from capture; ``install_probe_snat``
  adds that rule to each node netns.

Teardown is the lab's: every process and netns carries the lab prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import ipaddress
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from e2e.fakekube import FakeApiServer, TokenReviewResult, pod_token_user
from e2e.lab import topology
from e2e.lab.spec import PodSpec, WaypointSpec, netns_path
from e2e.netns import in_netns
from ztunnel.config import PROBE_SNAT_IPV4

if TYPE_CHECKING:
    from e2e.lab.cluster import Lab

CP_IP = ipaddress.IPv4Address("10.240.0.250")
API_PORT = 6443
SERVICE_CLUSTER_IP_RANGE = "10.96.1.0/24"
"""The fake API server's Service range: beside the lab spec's VIPs (10.96.0.0/24), never on them."""
XDS_PORT = 15012
MONITORING_PORT = 15014
ZTUNNEL_NAMESPACE = "ambient-system"  # as deploy/ztunnel; the CA trusts this node agent account
ZTUNNEL_ACCOUNT = "ztunnel"
READY_TIMEOUT = 30.0
_CLONE_NEWNET = 0x40000000


class KubeLabError(RuntimeError):
    """The Kubernetes side of the lab failed; the message names the part (netns, server, process)."""


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as handle:
        if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")


class _ApiServerThread:
    """The fake API server on its own loop, in a thread that lives in the control-plane netns."""

    def __init__(self, netns: str, reviewer: Any) -> None:
        self.server = FakeApiServer(
            host="0.0.0.0",
            port=API_PORT,
            bookmark_interval=0.5,
            token_reviewer=reviewer,
            # ClusterIPs the API server allocates (the manager's waypoint Services) must not
            # collide with the spec's VIPs (10.96.0.0/24): the first is 10.96.1.10.
            service_cluster_ip_range=SERVICE_CLUSTER_IP_RANGE,
        )
        self._netns = netns
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                _setns(netns_path(self._netns))  # only this thread moves
                asyncio.set_event_loop(self._loop)
                self._loop.run_until_complete(self.server.start())
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="lab-apiserver", daemon=True)
        self._thread.start()
        if not started.wait(timeout=30):
            raise KubeLabError("fake API server did not start within 30 s")
        if failure:
            raise KubeLabError(f"fake API server in {self._netns}: {failure[0]}")

    def stop(self) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None


@dataclass
class KubeLab:
    """The Kubernetes side of one lab. ``start()`` after ``Lab.up(..., ztunnel=False)``."""

    lab: Lab
    ambient_namespaces: tuple[str, ...] = ()
    cp_ip: ipaddress.IPv4Address = CP_IP
    tokens: dict[str, str] = field(default_factory=dict)  # node -> token
    _api: _ApiServerThread | None = None
    manager: subprocess.Popen[bytes] | None = None
    reviews: int = 0
    pod_tokens: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    """token -> (namespace, service account, pod, node) of the waypoint pods the lab started."""
    _pod_env: dict[str, dict[str, str]] = field(default_factory=dict)
    _pod_args: dict[str, list[str]] = field(default_factory=dict)

    # --- names and paths -------------------------------------------------------------------

    @property
    def netns(self) -> str:
        return f"{self.lab.prefix}-cp"

    @property
    def dir(self) -> Path:
        return self.lab.run_dir / "kube"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> FakeApiServer:
        if self._api is None:
            raise KubeLabError("the API server is not running")
        return self._api.server

    def token_path(self, node: str) -> Path:
        return self.dir / node / "istio-token"

    @property
    def xds_address(self) -> str:
        # TLS as in a cluster: the manager's self-issued serving certificate carries the lab's
        # control-plane IP as a SAN, verified with the lab CA's root (root_cert_path).
        return f"https://{self.cp_ip}:{XDS_PORT}"

    @property
    def root_cert_path(self) -> Path:
        """The published root (istio-ca-root-cert's root-cert.pem) clients verify the manager with."""
        return self.lab.ca_dir / "root-cert.pem"

    # --- life cycle ------------------------------------------------------------------------

    def start(self, *, manager: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._build_netns()
        self._api = _ApiServerThread(self.netns, self._review)
        self._api.start()
        self._write_kubeconfig()
        self.mirror()
        if manager:
            self.start_manager()

    def stop(self) -> None:
        if self.manager is not None:
            topology.kill_pids([self.manager.pid], grace=5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.manager.wait(timeout=2)
            self.manager = None
        if self._api is not None:
            self._api.stop()
            self._api = None

    def _build_netns(self) -> None:
        ns, fabric = self.netns, self.lab.names.fabric
        if ns not in self.lab.namespaces:
            self.lab.namespaces.append(ns)  # recorded before creation: `down` removes it
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "cp", "netns", fabric],
            ["ip", "-n", fabric, "link", "set", "cp", "master", "br0"],
            ["ip", "-n", fabric, "link", "set", "cp", "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "addr", "add", f"{self.cp_ip}/24", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "eth0", "up"],
            # Pods (waypoints) talk to the API server and the control plane too: route replies.
            *(
                ["ip", "-n", ns, "route", "add", str(n.pod_cidr), "via", str(n.ip)]
                for n in self.lab.spec.nodes
            ),
        ):  # fmt: skip
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            if proc.returncode != 0:
                raise KubeLabError(f"control-plane netns: {' '.join(argv)}: {proc.stderr.strip()}")

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {"server": f"http://{self.cp_ip}:{API_PORT}"}}],
            "users": [{"name": "lab", "user": {"token": "lab-admin-token"}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
            "current-context": "lab",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))

    # --- objects ---------------------------------------------------------------------------

    def mirror(self) -> None:
        """Put every lab pod, namespace, service account and service (and the ztunnel pods)."""
        spec = self.lab.spec
        put = self.server.put_object
        namespaces = {ZTUNNEL_NAMESPACE} | {p.namespace for p in spec.pods}
        for ns in sorted(namespaces):
            put(self.namespace_object(ns, ambient=ns in self.ambient_namespaces))
        accounts = {(ZTUNNEL_NAMESPACE, ZTUNNEL_ACCOUNT)} | {
            # A waypoint's account is the manager's to create (it refuses one it does not own).
            (p.namespace, p.service_account)
            for p in spec.pods
            if p.waypoint is None
        }
        for ns, sa in sorted(accounts):
            put(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": sa, "namespace": ns},
                }
            )
        for node in spec.nodes:
            put(self._ztunnel_pod(node.name, str(node.ip)))
            token = self.tokens.setdefault(node.name, secrets.token_hex(24))
            path = self.token_path(node.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token + "\n")
        for pod in spec.pods:
            if pod.waypoint is None:  # waypoint replicas come from the manager's Deployments
                put(self.pod_object(pod))
        for svc in spec.services:
            ports = [
                {"name": f"tcp-{port}", "port": port, "targetPort": target, "protocol": "TCP"}
                for port, target in sorted(svc.ports.items())
            ]
            put(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": svc.name, "namespace": svc.namespace},
                    "spec": {
                        "type": "ClusterIP",
                        "clusterIP": str(svc.vip),
                        "clusterIPs": [str(svc.vip)],
                        "selector": dict(svc.selector),
                        "ports": ports,
                    },
                }
            )
            members = [
                p
                for p in spec.pods
                if p.namespace == svc.namespace
                and p.waypoint is None
                and all(p.labels.get(k) == v for k, v in svc.selector.items())
            ]
            put(self._endpoint_slice(svc.name, svc.namespace, ports, members))

    @staticmethod
    def namespace_object(name: str, *, ambient: bool) -> dict[str, Any]:
        labels = {"kubernetes.io/metadata.name": name}
        if ambient:
            labels["istio.io/dataplane-mode"] = "ambient"
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }

    def set_namespace_ambient(self, name: str, ambient: bool) -> None:
        """Label (or unlabel) a namespace, as ``kubectl label ns NAME istio.io/dataplane-mode=ambient``."""
        obj = self.server.get_object("v1", "Namespace", name)
        if obj is None:
            raise KubeLabError(f"namespace {name} does not exist")
        labels = dict((obj.get("metadata") or {}).get("labels") or {})
        if ambient:
            labels["istio.io/dataplane-mode"] = "ambient"
        else:
            labels.pop("istio.io/dataplane-mode", None)
        obj["metadata"]["labels"] = labels
        obj["metadata"].pop("resourceVersion", None)
        self.server.put_object(obj)

    def pod_object(self, pod: PodSpec) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)},
            "spec": {
                "nodeName": pod.node,
                "serviceAccountName": pod.service_account,
                "containers": [{"name": "app", "image": "ambient-lab/app"}],
            },
            "status": {
                "phase": "Running",
                "podIP": str(pod.ip),
                "podIPs": [{"ip": str(pod.ip)}],
                "hostIP": str(self.lab.spec.node(pod.node).ip),
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            },
        }

    def _ztunnel_pod(self, node: str, ip: str) -> dict[str, Any]:
        # The lab runs each ztunnel in its node's netns: a host-network pod in cluster terms.
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"ztunnel-{node}",
                "namespace": ZTUNNEL_NAMESPACE,
                "labels": {"app": "ztunnel", "istio.io/dataplane-mode": "none"},
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": ZTUNNEL_ACCOUNT,
                "hostNetwork": True,
                "containers": [{"name": "ztunnel", "image": "ambient-dataplane/ztunnel"}],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    @staticmethod
    def _endpoint_slice(
        service: str, namespace: str, ports: list[dict[str, Any]], members: Iterable[PodSpec]
    ) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-lab",
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [
                {"name": p["name"], "port": p["targetPort"], "protocol": "TCP"} for p in ports
            ],
            "endpoints": [
                {
                    "addresses": [str(p.ip)],
                    "conditions": {"ready": True},
                    "nodeName": p.node,
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace},
                }
                for p in members
            ],
        }

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.server.put_object(obj)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        self.server.delete_object(api_version, kind, name, namespace)

    # --- TokenReview -----------------------------------------------------------------------

    def _review(self, token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
        self.reviews += 1
        for known, (ns, sa, pod_name, node) in list(self.pod_tokens.items()):
            if secrets.compare_digest(token, known):
                pod = self.server.get_object("v1", "Pod", pod_name, ns)
                if pod is None:
                    break
                return pod_token_user(
                    namespace=ns,
                    service_account=sa,
                    pod_name=pod_name,
                    pod_uid=str(pod["metadata"]["uid"]),
                    node_name=node,
                    audiences=audiences,
                )
        for node, known in self.tokens.items():
            if secrets.compare_digest(token, known):
                pod = self.server.get_object("v1", "Pod", f"ztunnel-{node}", ZTUNNEL_NAMESPACE)
                if pod is None:
                    break
                return pod_token_user(
                    namespace=ZTUNNEL_NAMESPACE,
                    service_account=ZTUNNEL_ACCOUNT,
                    pod_name=f"ztunnel-{node}",
                    pod_uid=str(pod["metadata"]["uid"]),
                    node_name=node,
                    audiences=audiences,
                )
        return TokenReviewResult(authenticated=False, error="[invalid bearer token]")

    # --- processes -------------------------------------------------------------------------

    def start_manager(self, *, log_level: str = "info") -> None:
        log_path = self.dir / "manager.log"
        argv = [
            "ip", "netns", "exec", self.netns,
            self.lab.python, "-m", "waypoint.cli", "manager",
            f"--kubeconfig={self.kubeconfig}",
            f"--xds-address=0.0.0.0:{XDS_PORT}",
            f"--monitoring-address=0.0.0.0:{MONITORING_PORT}",
            f"--ca-dir={self.lab.ca_dir}",
            f"--serving-ip={self.cp_ip}",
            f"--mesh-trust-domain={self.lab.spec.trust_domain}",
            f"--trust-domain={self.lab.spec.trust_domain}",
            f"--trusted-node-accounts={ZTUNNEL_NAMESPACE}/{ZTUNNEL_ACCOUNT}",
            "--no-leader-elect",
            f"--log-level={log_level.upper()}",
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            self.manager = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.manager.poll() is not None:
                raise KubeLabError(f"waypoint manager exited; log {log_path}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.http_cp(MONITORING_PORT, "/readyz", timeout=1.0)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise KubeLabError(
                    f"waypoint manager not ready; log {log_path}:\n{_tail(log_path)}"
                )
            time.sleep(0.1)

    def http_cp(self, port: int, path: str, *, timeout: float = 5.0) -> tuple[int, str]:
        """GET http://127.0.0.1:port/path inside the control-plane netns (manager monitoring)."""
        sock = in_netns(
            netns_path(self.netns),
            lambda: socket.create_connection(("127.0.0.1", port), timeout=timeout),
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.sock = sock
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def ztunnel_env(self, node: str) -> dict[str, str]:
        """The DaemonSet's environment for the ztunnel of ``node`` (deploy/ztunnel/daemonset.yaml)."""
        spec = self.lab.spec
        return {
            "XDS_ADDRESS": self.xds_address,
            "CA_ADDRESS": self.xds_address,
            "XDS_ROOT_CA": str(self.root_cert_path),
            "CA_ROOT_CA": str(self.root_cert_path),
            "NODE_NAME": node,
            "POD_NAME": f"ztunnel-{node}",
            "POD_NAMESPACE": ZTUNNEL_NAMESPACE,
            "INSTANCE_IP": str(spec.node(node).ip),
            "CLUSTER_ID": "Kubernetes",
            "TRUST_DOMAIN": spec.trust_domain,
            "ISTIO_TOKEN_PATH": str(self.token_path(node)),
            "KUBECONFIG": str(self.kubeconfig),
            # Only this lab's namespaces: other labs on the machine reuse the same pod IPs.
            "POD_NETNS_GLOB": f"{self.lab.prefix}-*",
            "HOST_PROC": "",
        }

    def ztunnel_argv(self, node: str, ports: tuple[int, int, int], log_level: str) -> list[str]:
        admin, metrics, ready = ports
        return [
            "ip", "netns", "exec", self.lab.node_netns(node),
            "env", *(f"{k}={v}" for k, v in sorted(self.ztunnel_env(node).items())),
            self.lab.python, "-m", "ztunnel.cli", "run",
            "--placement", "inpod",
            "--pod-retry-interval", "1",
            "--admin-port", str(admin),
            "--metrics-port", str(metrics),
            "--readiness-port", str(ready),
            "--log-level", log_level,
        ]  # fmt: skip

    def start_ztunnels(self, *, log_level: str = "info") -> None:
        """One ztunnel per node in Kubernetes mode, through the lab's process bookkeeping."""
        self.lab.ztunnel_argv = self.ztunnel_argv  # type: ignore[method-assign]
        for node in self.lab.spec.nodes:
            self.lab.start_ztunnel(node.name, log_level=log_level)
        self.lab.wait_ready()

    # --- the kubelet for waypoint Deployments ------------------------------------------------------

    def wait_object(
        self, api_version: str, kind: str, name: str, namespace: str | None, timeout: float = 20.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (obj := self.server.get_object(api_version, kind, name, namespace)) is None:
            if time.monotonic() > deadline:
                where = f"{namespace}/{name}" if namespace else name
                raise KubeLabError(
                    f"{kind} {where} did not appear within {timeout:.0f} s; manager log "
                    f"{self.dir / 'manager.log'}:\n{_tail(self.dir / 'manager.log')}"
                )
            time.sleep(0.05)
        return obj

    def run_deployment(
        self, namespace: str, name: str, *, timeout: float = 20.0, log_level: str = "info"
    ) -> list[str]:
        """Play the Deployment controller and kubelet for the waypoint Deployment ``namespace/name``:
        Pods for the spec's replicas of that waypoint, ``waypoint proxy`` in each, wait until
        ready, report ``readyReplicas``. Returns the pod names."""
        dep = self.wait_object("apps/v1", "Deployment", name, namespace, timeout)
        try:
            waypoint = self.lab.spec.waypoint(f"{namespace}/{name}")
        except KeyError:
            raise KubeLabError(
                f"Deployment {namespace}/{name}: the lab spec declares no waypoint {name} in "
                f"{namespace} (its replicas' netns are built at start-up)"
            ) from None
        template = dep["spec"]["template"]
        wanted = int(dep["spec"].get("replicas") or 1)
        pods = list(waypoint.pods[: max(1, wanted)])
        template_hash = secrets.token_hex(5)[:10]
        rs = self.put(
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{name}-{template_hash}",
                    "namespace": namespace,
                    "labels": {
                        **template["metadata"]["labels"],
                        "pod-template-hash": template_hash,
                    },
                    "ownerReferences": [_controller_ref(dep)],
                },
                "spec": {
                    "replicas": len(pods),
                    "selector": dep["spec"]["selector"],
                    "template": template,
                },
            }
        )
        self.lab.waypoint_argv = self._waypoint_pod_argv  # type: ignore[method-assign]
        for pod_name in pods:
            self._start_waypoint_pod(waypoint, pod_name, template, rs, template_hash, log_level)
        self.lab.wait_waypoints_ready()
        current = self.server.get_object("apps/v1", "Deployment", name, namespace) or dep
        current["status"] = {
            "observedGeneration": current["metadata"].get("generation", 1),
            "replicas": len(pods),
            "readyReplicas": len(pods),
            "availableReplicas": len(pods),
            "updatedReplicas": len(pods),
        }
        self.put(current)
        return pods

    def _start_waypoint_pod(
        self,
        waypoint: WaypointSpec,
        pod_name: str,
        template: Mapping[str, Any],
        rs: Mapping[str, Any],
        template_hash: str,
        log_level: str,
    ) -> None:
        p = self.lab.spec.pod(pod_name)
        tspec = template["spec"]
        account = str(tspec.get("serviceAccountName") or "default")
        container = tspec["containers"][0]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pod = self.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": p.name,
                    "namespace": p.namespace,
                    "labels": {
                        **template["metadata"]["labels"],
                        "pod-template-hash": template_hash,
                    },
                    "annotations": dict(template["metadata"].get("annotations") or {}),
                    "ownerReferences": [_controller_ref(rs)],
                },
                "spec": {**tspec, "nodeName": p.node},
                "status": {
                    "phase": "Running",
                    "podIP": str(p.ip),
                    "podIPs": [{"ip": str(p.ip)}],
                    "hostIP": str(self.lab.spec.node(p.node).ip),
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                },
            }
        )
        # The projected service-account token (audience istio-ca), bound to this pod.
        token = secrets.token_hex(24)
        self.pod_tokens[token] = (p.namespace, account, p.name, p.node)
        token_file = self.dir / "pods" / p.name / "istio-token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token + "\n")
        env = self.container_env(container, pod)
        token_dir = _projected_token_dir(tspec, container)
        for key, value in list(env.items()):
            if token_dir and value.startswith(token_dir + "/"):
                env[key] = str(token_file.parent / value.removeprefix(token_dir + "/"))
            elif value.startswith(("https://", "http://")) and value.rstrip("/").endswith(
                f":{XDS_PORT}"
            ):
                env[key] = self.xds_address  # the lab's "cluster DNS" for the control plane
        env["KUBECONFIG"] = str(self.kubeconfig)  # stands in for the in-cluster service account
        # The mounted istio-ca-root-cert, here the lab CA's root file.
        env["XDS_ROOT_CA"] = env["CA_ROOT_CA"] = str(self.root_cert_path)
        command = list(container.get("command") or [])
        if command[:1] != ["waypoint"]:
            raise KubeLabError(f"waypoint Deployment runs {command}, not the waypoint command")
        self._pod_env[p.name] = env
        self._pod_args[p.name] = [str(a) for a in container.get("args") or []]
        self.lab.start_waypoint(p.name, log_level=log_level)

    @staticmethod
    def container_env(container: Mapping[str, Any], pod: Mapping[str, Any]) -> dict[str, str]:
        """The container's env with the downward API (fieldRef) resolved from ``pod``."""
        out: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                out[item["name"]] = str(item["value"])
                continue
            path = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
            value: Any = pod
            for part in path.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is None:
                raise KubeLabError(f"env {item['name']}: cannot resolve {item.get('valueFrom')}")
            out[item["name"]] = str(value)
        return out

    def _waypoint_pod_argv(
        self, pod: str, log_level: str, extra_args: Iterable[str] = ()
    ) -> list[str]:
        env = self._pod_env[pod]
        return [
            "ip", "netns", "exec", self.lab.pod_netns(pod),
            "env", *(f"{k}={v}" for k, v in sorted(env.items())),
            self.lab.python, "-m", "waypoint.cli", *self._pod_args[pod],
            "--log-level", log_level, *extra_args,
        ]  # fmt: skip

    # --- the kubelet's health probe -------------------------------------------------------------

    def install_probe_snat(self) -> None:
        """istio-cni's host rule in every node netns: node-local sockets to pods are SNATed to
        169.254.7.127, which the in-pod rules let through uncaptured."""
        for node in self.lab.spec.nodes:
            ns = self.lab.node_netns(node.name)
            cidr = str(node.pod_cidr)
            rule = ["-t", "nat", "-A", "POSTROUTING", "-m", "owner", "--socket-exists", "-p", "tcp",
                    "-d", cidr, "-j", "SNAT", "--to-source", PROBE_SNAT_IPV4]  # fmt: skip
            for argv in (
                ["ip", "-n", ns, "addr", "add", f"{PROBE_SNAT_IPV4}/32", "dev", "lo"],
                ["ip", "netns", "exec", ns, "iptables", *rule],
            ):
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
                if proc.returncode != 0 and "File exists" not in proc.stderr:
                    raise KubeLabError(f"probe SNAT in {ns}: {' '.join(argv)}: {proc.stderr}")

    def probe(self, pod: str, port: int, path: str = "/", *, timeout: float = 3.0) -> int:
        """An HTTP GET from the pod's node to the pod (the kubelet's httpGet probe): the status."""
        p = self.lab.spec.pod(pod)
        sock = in_netns(
            netns_path(self.lab.node_netns(p.node)),
            lambda: socket.create_connection((str(p.ip), port), timeout=timeout),
        )
        conn = http.client.HTTPConnection(str(p.ip), port, timeout=timeout)
        conn.sock = sock
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()


def _controller_ref(owner: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _projected_token_dir(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> str:
    """Where the container mounts a projected service-account token with audience istio-ca."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        sources = ((volumes.get(mount["name"]) or {}).get("projected") or {}).get("sources") or []
        for source in sources:
            if (source.get("serviceAccountToken") or {}).get("audience") == "istio-ca":
                return str(mount["mountPath"]).rstrip("/")
    return ""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
