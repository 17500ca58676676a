"""Cluster mode end to end: the lab backed by the fake API server, the manager as control plane.

Everything a cluster gives our data plane comes from Kubernetes objects: lab pods exist as Pod
objects, the manager (in its own netns on the fabric) serves xDS and certificates, and each node's
ztunnel runs in Kubernetes mode (``XDS_ADDRESS``, token, no config file), watching its node's pods
and the namespace labels. One lab serves the module; the tests run in order and build on each other:

1. the namespace is not labelled: traffic is plain TCP on the wire;
2. labelling it ``ambient`` puts the running pods in the mesh (HBONE on the node link), without
   restarting them;
3. kubelet probes keep working: ``KubeLab.probe`` connects from the node with the source SNATed to
   169.254.7.127 (istio-cni's host rule), which the in-pod rules let through uncaptured - checked
   under a DENY-all-plaintext policy that would refuse a captured probe;
4. an AuthorizationPolicy created through the API denies within 1 s;
5. a restarted ztunnel (hitless, SO_REUSEPORT) adopts the pods at start-up: rules verified, not
   rewritten;
6. removing the label takes the pods out again (rules removed, plain TCP), still without restarts.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.demo import curl
from e2e.lab.cluster import Lab
from e2e.lab.kube import KubeLab
from e2e.lab.spec import netns_path
from e2e.lab.wire import WireReport, analyze, segments_from_pcap
from netfilter import PodNetfilter

pytestmark = pytest.mark.timeout(180)

SECRET = "cluster-mode-secret-7781"
APPS: dict[str, subprocess.Popen[str]] = {}  # the pods' processes: never restarted by the mesh
SPEC = """\
trustDomain: cluster.local
nodes: [{name: n1}, {name: n2}]
pods:
  # Mesh membership comes from the namespace label in Kubernetes mode, not from the spec.
  - {name: client, namespace: shop, serviceAccount: client, node: n1, labels: {app: client}, mesh: false}
  - {name: server, namespace: shop, serviceAccount: server, node: n2, labels: {app: server}, mesh: false}
services:
  - {name: server, namespace: shop, selector: {app: server}, ports: {80: 8080}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, KubeLab]]:
    spec = Path(tmp_path_factory.mktemp("cluster")) / "spec.yaml"
    spec.write_text(SPEC)
    lab = Lab.up(spec, ztunnel=False)
    kube = KubeLab(lab)
    try:
        kube.start()
        kube.install_probe_snat()
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


def captured(lab: Lab, pod: str) -> bool:
    return PodNetfilter().verify(netns_path(lab.pod_netns(pod)), lab.inpod) == []


def served(lab: Lab, pod: str) -> bool:
    p = lab.pod(pod)
    state = lab.config_dump(p.node).get("workloadState", {})
    return state.get(p.uid, {}).get("state") == "Up"


def wire(lab: Lab, kube: KubeLab, name: str, n: int = 3) -> tuple[WireReport, list[str]]:
    with lab.capture("n1", name=name) as pcap:
        statuses = [
            curl(lab, "client", f"http://{lab.ip('server')}:8080/", data=SECRET).status
            for _ in range(n)
        ]
    # The node link also carries the ztunnel's own xDS/API traffic to the control plane.
    segments = [s for s in segments_from_pcap(str(pcap)) if str(kube.cp_ip) not in (s.src, s.dst)]
    return analyze(segments, secret=SECRET.encode()), statuses


def test_1_unlabelled_namespace_is_plain_tcp(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    assert all(lab.status()["nodes"][i]["ztunnel"]["ready"] for i in (0, 1))
    report, statuses = wire(lab, kube, "k8s-before")
    assert statuses == ["200"] * 3
    assert report.secret_seen
    assert not captured(lab, "client")


def test_2_label_puts_running_pods_in_the_mesh(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    app_pid = APPS["server"].pid
    kube.set_namespace_ambient("shop", True)
    wait_for(lambda: captured(lab, "client") and captured(lab, "server"), "capture rules")
    wait_for(lambda: served(lab, "client") and served(lab, "server"), "in-pod listeners")
    report, statuses = wire(lab, kube, "k8s-mesh")
    assert statuses == ["200"] * 3
    assert report.ok, report.problems
    assert ("h2",) in {f.alpn for f in report.flows}
    # The identities came from the manager's CA, over the node's token (same-node rule).
    certs = {c["identity"] for c in lab.config_dump("n2")["certificates"]}
    assert "spiffe://cluster.local/ns/shop/sa/server" in certs
    assert APPS["server"].poll() is None
    assert APPS["server"].pid == app_pid


def test_3_kubelet_probe_bypasses_capture(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    assert captured(lab, "server")
    # Deny every plaintext (identity-less) caller of the server: a captured probe would be refused.
    kube.put(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "mesh-only", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "server"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}],
            },
        }
    )
    try:
        assert kube.probe("server", 8080) == 200
    finally:
        kube.delete("security.istio.io/v1", "AuthorizationPolicy", "mesh-only", "shop")


def test_4_authorization_policy_denies_within_a_second(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    url = f"http://{lab.ip('server')}:8080/"
    assert curl(lab, "client", url).status == "200"
    kube.put(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-client", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "server"}},
                "action": "DENY",
                "rules": [
                    {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}
                ],
            },
        }
    )
    try:
        took = wait_for(lambda: curl(lab, "client", url).status != "200", "denial", 5.0, 0.02)
        assert took < 1.0, f"denied only after {took:.2f} s"
        assert kube.probe("server", 8080) == 200  # probes are not mesh traffic
    finally:
        kube.delete("security.istio.io/v1", "AuthorizationPolicy", "deny-client", "shop")
    wait_for(lambda: curl(lab, "client", url).status == "200", "policy removal")


def test_5_restarted_ztunnel_adopts_what_is_programmed(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    lab.restart_ztunnel("n2")  # hitless: the new one binds beside the old one, then SIGTERM
    dump = lab.config_dump("n2")
    assert dump["workloadState"][lab.pod("server").uid]["state"] == "Up"
    # Start-up reconcile found the server's rules live and intact: adopted, nothing rewritten.
    assert dump["nodeAgent"]["counters"]["rules_changed_total"] == 0
    report, statuses = wire(lab, kube, "k8s-restart")
    assert statuses == ["200"] * 3
    assert report.ok, report.problems


def test_6_unlabel_takes_pods_out(cluster: tuple[Lab, KubeLab]) -> None:
    lab, kube = cluster
    kube.set_namespace_ambient("shop", False)
    wait_for(lambda: not captured(lab, "client") and not captured(lab, "server"), "rules removed")
    report, statuses = wire(lab, kube, "k8s-after")
    assert statuses == ["200"] * 3
    assert report.secret_seen
    assert APPS["server"].poll() is None  # the same process served all along
