"""Golden-file and property tests of waypoint.manager.render (regenerate with UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from waypoint.manager.model import (
    GATEWAY_CLASS_LABEL,
    GATEWAY_NAME_LABEL,
    MANAGED_LABEL,
    parse_gateway,
)
from waypoint.manager.params import Params, parse_params
from waypoint.manager.render import RenderConfig, RenderError, render

from .helpers import configmap, gateway

GOLDEN = Path(__file__).parent / "golden"
CONFIG = RenderConfig(image="registry.example/ambient/waypoint:0.1.0")

CUSTOM_CM = configmap(
    "waypoint-params",
    minReplicas="3",
    maxReplicas="20",
    cpuTargetUtilization="60",
    requestsPerSecondTarget="250",
    scaleDownStabilizationSeconds="600",
    minAvailable="2",
    resources="requests: {cpu: 500m, memory: 256Mi}\nlimits: {memory: 2Gi}\n",
    terminationGracePeriodSeconds="120",
    deployment="spec:\n  template:\n    spec:\n      nodeSelector: {pool: mesh}\n",
)


def _cases() -> dict[str, tuple[dict[str, Any], Params]]:
    return {
        "typical": (gateway(), Params()),
        "customised": (
            gateway(
                labels={"istio.io/waypoint-for": "all"},
                infrastructure={
                    "labels": {"team": "payments", "gateway.networking.k8s.io/ignored": "x"},
                    "annotations": {"example.com/owner": "payments"},
                    "parametersRef": {"group": "", "kind": "ConfigMap", "name": "waypoint-params"},
                },
                allowed_from="All",
            ),
            parse_params(CUSTOM_CM),
        ),
        "autoscaling-off": (
            gateway(name="static"),
            parse_params(
                configmap("p", autoscaling="false", disruptionBudget="false", minReplicas="3")
            ),
        ),
        "service-account-form": (
            gateway(
                name="reviews-waypoint",
                class_name="istio-mesh",
                annotations={"istio.io/service-account": "reviews"},
            ),
            Params(),
        ),
    }


CASES = _cases()


def _dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_render_matches_golden_file(case: str) -> None:
    gw, params = CASES[case]
    text = _dump(render(parse_gateway(gw), params, CONFIG))
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_render_is_deterministic(case: str) -> None:
    gw, params = CASES[case]
    assert render(parse_gateway(gw), params, CONFIG) == render(parse_gateway(gw), params, CONFIG)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_every_object_is_labelled_owned_and_namespaced(case: str) -> None:
    gw, params = CASES[case]
    parsed = parse_gateway(gw)
    for obj in render(parsed, params, CONFIG):
        meta = obj["metadata"]
        assert meta["namespace"] == "shop"
        assert meta["labels"][GATEWAY_NAME_LABEL] == parsed.name
        assert meta["labels"][GATEWAY_CLASS_LABEL] == parsed.class_name
        assert meta["labels"][MANAGED_LABEL] == "istio.io-mesh-controller"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "name": parsed.name,
                "uid": parsed.uid,
            }
        ]


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def test_typical_waypoint_defaults() -> None:
    objs = _by_kind(render(parse_gateway(gateway()), Params(), CONFIG))
    assert set(objs) == {
        "ServiceAccount",
        "RoleBinding",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    dep = objs["Deployment"]["spec"]
    assert "replicas" not in dep, "the HPA owns the replica count"
    pod = dep["template"]
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 30
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["proxy"]
    assert container["readinessProbe"]["httpGet"]["port"] == 15021
    assert "preStop" in container["lifecycle"]
    keys = {c["topologyKey"] for c in pod["spec"]["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert {p["port"] for p in objs["Service"]["spec"]["ports"]} == {15008, 15020, 15021}
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "waypoint",
    }
    down = hpa["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]
    assert objs["PodDisruptionBudget"]["spec"]["minAvailable"] == 1


def test_customised_copies_infrastructure_and_adds_rps_metric() -> None:
    gw, params = CASES["customised"]
    objs = _by_kind(render(parse_gateway(gw), params, CONFIG))
    for obj in objs.values():
        assert obj["metadata"]["labels"]["team"] == "payments"
        assert "gateway.networking.k8s.io/ignored" not in obj["metadata"]["labels"]
        assert obj["metadata"]["annotations"]["example.com/owner"] == "payments"
    metrics = objs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metrics[1]["pods"]["metric"]["name"] == "istio_requests_per_second"
    assert metrics[1]["pods"]["target"]["averageValue"] == "250"
    assert objs["Deployment"]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "mesh"}


def test_autoscaling_off_pins_replicas_and_drops_hpa_and_pdb() -> None:
    gw, params = CASES["autoscaling-off"]
    objs = _by_kind(render(parse_gateway(gw), params, CONFIG))
    assert set(objs) == {"ServiceAccount", "RoleBinding", "Deployment", "Service"}
    assert objs["Deployment"]["spec"]["replicas"] == 3


def test_role_binding_lets_the_waypoint_account_read_its_namespace() -> None:
    objs = _by_kind(render(parse_gateway(gateway()), Params(), CONFIG))
    rb = objs["RoleBinding"]
    assert rb["metadata"]["namespace"] == "shop"
    assert rb["metadata"]["labels"][MANAGED_LABEL]
    assert rb["metadata"]["ownerReferences"][0]["kind"] == "Gateway"
    assert rb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "ambient-waypoint-proxy",
    }
    account = objs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "shop"}]
    assert objs["ServiceAccount"]["metadata"]["name"] == account


def test_role_binding_can_be_switched_off_and_is_never_overlaid() -> None:
    off = render(parse_gateway(gateway()), Params(), RenderConfig(proxy_cluster_role=""))
    assert "RoleBinding" not in {o["kind"] for o in off}
    # No overlay key reaches the RoleBinding, whatever the ConfigMap says.
    params = parse_params(configmap("p", deployment="metadata: {annotations: {a: b}}"))
    objs = _by_kind(render(parse_gateway(gateway()), params, CONFIG))
    assert "annotations" not in objs["RoleBinding"]["metadata"]


@pytest.mark.parametrize(
    ("overlay", "match"),
    [
        ("metadata: {name: other}", "illegal metadata change of name"),
        ("metadata: {labels: {gateway.istio.io/managed: me}}", "illegal change of label"),
        ("kind: StatefulSet", "apiVersion/kind"),
        ("spec: {$patch: replace}", "not supported"),
    ],
    ids=["rename", "managed-label", "kind", "patch-directive"],
)
def test_overlay_may_not_change_identity(overlay: str, match: str) -> None:
    params = parse_params(configmap("p", deployment=overlay))
    with pytest.raises(RenderError, match=match):
        render(parse_gateway(gateway()), params, CONFIG)


def test_overlay_merges_containers_by_name() -> None:
    overlay = "spec:\n  template:\n    spec:\n      containers:\n      - name: istio-proxy\n        resources: {requests: {cpu: 200m}}\n"
    params = parse_params(configmap("p", deployment=overlay))
    dep = _by_kind(render(parse_gateway(gateway()), params, CONFIG))["Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "200m", "memory": "128Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert container["image"] == CONFIG.image
