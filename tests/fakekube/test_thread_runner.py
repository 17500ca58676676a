"""The thread-backed runner: plain synchronous tests (and the lab) drive the server with the sync client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.fakekube import FakeApiServer


def test_sync_client_against_threaded_server(tmp_path: Path) -> None:
    with FakeApiServer.running_in_thread(bookmark_interval=0.1) as srv:
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file=str(srv.write_kubeconfig(tmp_path / "kc")), client_configuration=cfg
        )
        with kubernetes.client.ApiClient(cfg) as api_client:
            # Any: the sync client's stubs want model objects; it accepts plain dicts as well.
            core: Any = kubernetes.client.CoreV1Api(api_client)
            core.create_namespace({"metadata": {"name": "lab"}})
            pod = core.create_namespaced_pod(
                "lab",
                {
                    "metadata": {"name": "p"},
                    "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
                },
            )
            assert pod.status.phase == "Pending"
            # a kubelet-like component marks the pod running straight in the store (from this thread)
            live = srv.get_object("v1", "Pod", "p", "lab")
            assert live is not None
            live["status"] = {"phase": "Running", "podIP": "10.0.0.5"}
            stored = srv.put_object(live)
            assert int(stored["metadata"]["resourceVersion"]) > int(pod.metadata.resource_version)
            events = []
            w = kubernetes.watch.Watch()
            for event in w.stream(
                core.list_namespaced_pod,
                "lab",
                resource_version=pod.metadata.resource_version,
                field_selector="status.phase=Running",
                timeout_seconds=2,
            ):
                events.append(event)
                w.stop()
            assert [(e["type"], e["object"].status.pod_ip) for e in events] == [
                ("ADDED", "10.0.0.5")
            ]
            with pytest.raises(kubernetes.client.ApiException) as err:
                core.read_namespaced_pod("missing", "lab")
            assert err.value.status == 404
    with pytest.raises(RuntimeError):
        _ = srv.url  # stopped
