"""The local-pods provider fed by real list+watch (kubernetes_asyncio) from the fake API server.

Netns discovery is faked here (a table IP -> path); the real one runs in e2e/tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from e2e.fakekube import FakeApiServer
from ztunnel.kube.netns import Candidate, NetnsNotFound
from ztunnel.kube.provider import KubeLocalPods
from ztunnel.kube.watch import Reflector, api_client
from ztunnel.state.model import IPAddress, TunnelProtocol, Workload
from ztunnel.state.store import WorkloadStore

NODE = "node-a"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


class FakeFinder:
    def __init__(self) -> None:
        self.table: dict[IPAddress, str] = {}
        self.calls = 0

    def find(self, ips: Sequence[IPAddress], what: str) -> Candidate:
        self.calls += 1
        for ip in ips:
            if ip in self.table:
                path = self.table[ip]
                return Candidate(
                    path=path, netns_id=(1, hash(path) & 0xFFFF), addresses=frozenset()
                )
        raise NetnsNotFound(f"{what}: no network namespace holds {ips[0]}")

    def stat(self, path: str) -> tuple[int, int] | None:
        return (1, hash(path) & 0xFFFF) if path in self.table.values() else None


def ns_obj(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def pod_obj(name: str, node: str, ip: str, ns: str = "app", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "sa-" + name,
            "containers": [{"name": "c", "image": "x"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


async def eventually(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, KubeLocalPods, FakeFinder]]:
    async with FakeApiServer() as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        api = await api_client(str(kubeconfig))
        finder = FakeFinder()
        provider = KubeLocalPods(
            NODE,
            finder=finder,  # type: ignore[arg-type]
            retry_interval=0.05,
            stat=finder.stat,
        )
        reflectors = [
            Reflector(
                api,
                "/api/v1/pods",
                field_selector=f"spec.nodeName={NODE}",
                on_replace=provider.replace_pods,
                on_event=provider.on_pod,
                watch_timeout=5,
            ),
            Reflector(
                api,
                "/api/v1/namespaces",
                on_replace=provider.replace_namespaces,
                on_event=provider.on_namespace,
                watch_timeout=5,
            ),
        ]
        for r in reflectors:
            r.start()
        provider.start()
        try:
            yield server, provider, finder
        finally:
            await provider.stop()
            for r in reflectors:
                await r.stop()
            await api.close()


async def test_label_enrols_and_unlabel_removes(
    rig: tuple[FakeApiServer, KubeLocalPods, FakeFinder],
) -> None:
    server, provider, finder = rig
    store = WorkloadStore()
    wakes: list[int] = []
    provider.subscribe(lambda: wakes.append(1))
    server.put_object(ns_obj("app"))
    server.put_object(pod_obj("web", NODE, "10.0.0.5"))
    server.put_object(pod_obj("far", "node-b", "10.0.1.5"))  # not this node: never seen
    finder.table[ipaddress.ip_address("10.0.0.5")] = "/run/netns/web"
    await eventually(lambda: provider.synced, "synced")
    assert provider.pods(store, NODE) == {}
    assert provider.view.pod_count == 1

    server.put_object(ns_obj("app", AMBIENT))
    await eventually(lambda: bool(provider.pods(store, NODE)), "enrolment")
    (w,) = provider.pods(store, NODE).values()
    assert w.uid == "Kubernetes//Pod/app/web"
    assert w.netns == "/run/netns/web"
    assert str(w.identity()) == "spiffe://cluster.local/ns/app/sa/sa-web"
    assert wakes

    # The control plane's view is preferred once it arrives.
    store.upsert_workload(
        Workload(
            uid=w.uid,
            name="web",
            namespace="app",
            addresses=w.addresses,
            tunnel_protocol=TunnelProtocol.HBONE,
            service_account="sa-web",
            services={"app/web.app.svc.cluster.local": {}},
        )
    )
    (w2,) = provider.pods(store, NODE).values()
    assert "app/web.app.svc.cluster.local" in w2.services
    assert w2.netns == "/run/netns/web"

    server.put_object(ns_obj("app"))
    await eventually(lambda: not provider.pods(store, NODE), "removal")
    snap = provider.snapshot()
    assert snap["pods"] == {
        "app/web": {
            "enrolled": False,
            "reason": "namespace not ambient",
            "netns": None,
            "error": "",
        }
    }


async def test_pod_opt_out_delete_and_missing_netns(
    rig: tuple[FakeApiServer, KubeLocalPods, FakeFinder],
) -> None:
    server, provider, finder = rig
    store = WorkloadStore()
    server.put_object(ns_obj("app", AMBIENT))
    server.put_object(pod_obj("a", NODE, "10.0.0.1"))
    server.put_object(pod_obj("b", NODE, "10.0.0.2"))
    finder.table[ipaddress.ip_address("10.0.0.1")] = "/run/netns/a"
    await eventually(lambda: len(provider.pods(store, NODE)) == 1, "pod a")
    # b has no netns yet: listed as unresolved, retried, then found.
    await eventually(lambda: "app/b" in provider.unresolved, "b unresolved")
    assert "no network namespace holds 10.0.0.2" in provider.unresolved["app/b"]
    finder.table[ipaddress.ip_address("10.0.0.2")] = "/run/netns/b"
    await eventually(lambda: len(provider.pods(store, NODE)) == 2, "pod b found on retry")
    assert provider.unresolved == {}

    server.put_object(pod_obj("a", NODE, "10.0.0.1", **{"istio.io/dataplane-mode": "none"}))
    await eventually(lambda: len(provider.pods(store, NODE)) == 1, "a opted out")
    server.delete_object("v1", "Pod", "b", "app")
    await eventually(lambda: not provider.pods(store, NODE), "b deleted")


async def test_recreated_sandbox_is_found_again(
    rig: tuple[FakeApiServer, KubeLocalPods, FakeFinder],
) -> None:
    server, provider, finder = rig
    store = WorkloadStore()
    ip = ipaddress.ip_address("10.0.0.7")
    finder.table[ip] = "/run/netns/old"
    server.put_object(ns_obj("app", AMBIENT))
    server.put_object(pod_obj("c", NODE, "10.0.0.7"))
    await eventually(lambda: bool(provider.pods(store, NODE)), "pod c")
    finder.table[ip] = "/run/netns/new"  # old path vanished (stat fails), IP now elsewhere
    await eventually(
        lambda: [w.netns for w in provider.pods(store, NODE).values()] == ["/run/netns/new"],
        "new netns",
    )
