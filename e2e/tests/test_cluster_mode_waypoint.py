"""Cluster mode end to end, waypoints: a Gateway made through the API becomes a running waypoint.

The lab is backed by the fake API server; the manager (controller + control plane) and ztunnels run
in Kubernetes mode. The namespace ``shop`` is ``ambient`` from the start. The tests run in order:

1. a Gateway of class ``istio-waypoint`` created through the API makes the manager create the
   waypoint Deployment; the lab plays the Deployment controller and kubelet (``KubeLab.run_deployment``):
   Pods with the Deployment's labels and a ReplicaSet owner, ``waypoint proxy`` started in each
   replica's netns exactly as the container says - cluster mode: workloads over xDS, its own
   certificate from the CA with its own pod token, routes and policies from Kubernetes; the
   Gateway becomes Programmed with addresses;
2. labelling the Service ``istio.io/use-waypoint=waypoint`` sends its traffic through the waypoint:
   its request metrics count exactly the requests sent;
3. an L7 AuthorizationPolicy attached to the Service through the API denies one path with 403
   while the others keep working.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.demo import curl, metric_sum
from e2e.lab.cluster import Lab
from e2e.lab.kube import KubeLab

pytestmark = pytest.mark.timeout(180)

APPS: dict[str, subprocess.Popen[str]] = {}
SPEC = """\
trustDomain: cluster.local
nodes: [{name: n1}, {name: n2}]
pods:
  - {name: client, namespace: shop, serviceAccount: client, node: n1, labels: {app: client}, mesh: false}
  - {name: server, namespace: shop, serviceAccount: server, node: n2, labels: {app: server}, mesh: false}
services:
  - {name: server, namespace: shop, selector: {app: server}, ports: {80: 8080}}
# The replica's netns exists from the start; its Pod object and process come from the Deployment.
waypoints:
  - {name: waypoint, namespace: shop, node: n1, replicas: 1}
"""
GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "shop"},
    "spec": {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    },
}
DENY_ADMIN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "no-admin", "namespace": "shop"},
    "spec": {
        "targetRefs": [{"group": "", "kind": "Service", "name": "server"}],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
    },
}
GATEWAY_CLASSES = Path(__file__).resolve().parents[2] / "deploy" / "manager" / "gatewayclass.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, KubeLab]]:
    spec = Path(tmp_path_factory.mktemp("cluster-wp")) / "spec.yaml"
    spec.write_text(SPEC)
    lab = Lab.up(spec, ztunnel=False)
    kube = KubeLab(lab, ambient_namespaces=("shop",))
    try:
        kube.start()
        for obj in yaml.safe_load_all(GATEWAY_CLASSES.read_text()):  # as installed
            kube.put(obj)
        kube.start_ztunnels()
        APPS["server"] = lab.start_app("server", "http", 8080)
        yield lab, kube
    finally:
        kube.stop()
        assert lab.down() == []


def wait_for(
    predicate: Callable[[], bool], what: str, timeout: float = 15.0, interval: float = 0.05
) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def condition(obj: dict[str, Any] | None, kind: str) -> str | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return str(c.get("status"))
    return None


def waypoint_requests(lab: Lab, **labels: str) -> float:
    return metric_sum(lab.waypoint_metrics("shop/waypoint"), "istio_requests_total", **labels)


def url(lab: Lab, path: str = "/") -> str:
    return f"http://{lab.spec.service('shop/server').vip}:80{path}"


def test_1_gateway_creates_a_running_waypoint(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    kube.put(GATEWAY)
    pods = kube.run_deployment("shop", "waypoint")
    assert pods == ["waypoint-1"]
    dep = kube.server.get_object("apps/v1", "Deployment", "waypoint", "shop")
    assert dep is not None
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "XDS_ADDRESS" in env
    # The Pod the lab made looks like the ReplicaSet's: template labels, owner, node, IP.
    pod = kube.server.get_object("v1", "Pod", "waypoint-1", "shop")
    assert pod is not None
    assert pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    assert pod["status"]["podIP"] == str(lab.ip("waypoint-1"))
    # Its account may read its L7 configuration in its namespace (a RoleBinding owned by the
    # Gateway), and the mesh's roots are published there, as istiod does.
    rb = kube.server.get_object("rbac.authorization.k8s.io/v1", "RoleBinding", "waypoint", "shop")
    assert rb is not None
    assert rb["roleRef"]["name"] == "ambient-waypoint-proxy"
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "waypoint", "namespace": "shop"}]
    roots = lab.ca_dir.joinpath("root-cert.pem").read_text()

    def published(namespace: str) -> Callable[[], bool]:
        def check() -> bool:
            cm = kube.server.get_object("v1", "ConfigMap", "istio-ca-root-cert", namespace)
            return cm is not None and cm.get("data", {}).get("root-cert.pem") == roots

        return check

    for namespace in ("shop", "ambient-system"):
        wait_for(published(namespace), f"root certificate ConfigMap in {namespace}")

    # The manager publishes the Gateway once the Deployment has a ready replica.
    def gateway() -> dict[str, Any] | None:
        return kube.server.get_object("gateway.networking.k8s.io/v1", "Gateway", "waypoint", "shop")

    try:
        wait_for(lambda: condition(gateway(), "Programmed") == "True", "Gateway Programmed")
    except AssertionError as err:
        svc = kube.server.get_object("v1", "Service", "waypoint", "shop")
        dep = kube.server.get_object("apps/v1", "Deployment", "waypoint", "shop")
        raise AssertionError(
            f"{err}: Gateway status {(gateway() or {}).get('status')}; Service spec "
            f"{(svc or {}).get('spec')}; Deployment status {(dep or {}).get('status')}"
        ) from None
    # Its identity came from the CA with its own token (its log says so), no impersonation.
    log = lab.waypoints["waypoint-1"].log_path.read_text()
    assert "spiffe://cluster.local/ns/shop/sa/waypoint" in log
    assert waypoint_requests(lab) == 0


def test_2_use_waypoint_label_sends_traffic_through_it(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    assert curl(lab, "client", url(lab)).status == "200"  # meshed, not yet through the waypoint
    assert waypoint_requests(lab) == 0
    svc = kube.server.get_object("v1", "Service", "server", "shop")
    assert svc is not None
    svc["metadata"].setdefault("labels", {})["istio.io/use-waypoint"] = "waypoint"
    kube.put(svc)

    def through_waypoint() -> bool:
        assert curl(lab, "client", url(lab)).status == "200"
        return waypoint_requests(lab) > 0

    wait_for(through_waypoint, "traffic through the waypoint", timeout=20, interval=0.2)
    before = waypoint_requests(lab, response_code="200")
    n = 5
    statuses = [curl(lab, "client", url(lab, f"/item/{i}")).status for i in range(n)]
    assert statuses == ["200"] * n
    after = waypoint_requests(lab, response_code="200")
    assert after - before == n
    assert (
        waypoint_requests(
            lab,
            response_code="200",
            source_principal="spiffe://cluster.local/ns/shop/sa/client",
            destination_service="server.shop.svc.cluster.local",
        )
        >= n
    )


def test_3_l7_policy_through_the_api_denies_a_path(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    kube.put(DENY_ADMIN)
    try:
        wait_for(
            lambda: curl(lab, "client", url(lab, "/admin/x")).status == "403",
            "L7 denial",
            timeout=10,
            interval=0.1,
        )
        assert curl(lab, "client", url(lab, "/public")).status == "200"
        assert waypoint_requests(lab, response_code="403") >= 1
    finally:
        kube.delete("security.istio.io/v1", "AuthorizationPolicy", "no-admin", "shop")
    wait_for(lambda: curl(lab, "client", url(lab, "/admin/x")).status == "200", "policy removal")
