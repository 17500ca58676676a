"""The planner (desired vs observed) and the status calculator."""

from __future__ import annotations

import copy

from waypoint.manager.model import Problem, parse_gateway
from waypoint.manager.params import Params
from waypoint.manager.plan import contains, plan
from waypoint.manager.render import RenderConfig, render
from waypoint.manager.status import Runtime, gateway_status

from .helpers import gateway

GW = parse_gateway(gateway())
DESIRED = render(GW, Params(), RenderConfig())


def observed_copy(objs, rv: str = "7"):
    out = copy.deepcopy(objs)
    for o in out:
        o["metadata"].update(resourceVersion=rv, uid=f"uid-{o['kind']}")
        o.setdefault("status", {})
    return out


def test_nothing_exists_creates_everything() -> None:
    p = plan("shop", "waypoint", DESIRED, [])
    assert [a.key.kind for a in p.applies] == [
        "ServiceAccount",
        "RoleBinding",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    assert all(a.resource_version is None for a in p.applies)
    assert not p.deletes
    assert not p.foreign


def test_unchanged_objects_plan_no_write() -> None:
    p = plan("shop", "waypoint", DESIRED, observed_copy(DESIRED))
    assert p.empty
    assert len(p.unchanged) == 6


def test_changed_object_is_applied_pinned_to_seen_version() -> None:
    observed = observed_copy(DESIRED)
    (deployment,) = [o for o in observed if o["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 1
    p = plan("shop", "waypoint", DESIRED, observed)
    assert [(a.key.kind, a.resource_version) for a in p.applies] == [("Deployment", "7")]


def test_disabled_hpa_is_deleted_with_uid_precondition() -> None:
    without_hpa = render(GW, Params(autoscaling=False), RenderConfig())
    p = plan("shop", "waypoint", without_hpa, observed_copy(DESIRED))
    assert [(d.key.kind, d.uid) for d in p.deletes] == [
        ("HorizontalPodAutoscaler", "uid-HorizontalPodAutoscaler")
    ]


def test_foreign_objects_are_reported_never_touched_or_deleted() -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "waypoint", "namespace": "shop"},
    }
    stray = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": "other",
            "namespace": "shop",
            "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"},
        },
    }
    p = plan("shop", "waypoint", DESIRED, [foreign, stray])
    assert [f.key.kind for f in p.foreign] == ["ServiceAccount"]
    assert "without label gateway.istio.io/managed" in p.foreign[0].reason
    assert "ServiceAccount" not in [a.key.kind for a in p.applies]
    assert not p.deletes


def test_gateway_gone_deletes_only_its_managed_objects() -> None:
    other_gw = render(parse_gateway(gateway("other")), Params(), RenderConfig())
    p = plan("shop", "waypoint", [], observed_copy(DESIRED) + observed_copy(other_gw))
    assert {(d.key.kind, d.key.name) for d in p.deletes} == {
        (o["kind"], "waypoint") for o in DESIRED
    }


def test_contains_ignores_server_defaults() -> None:
    assert contains({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 2}})
    assert not contains({"a": [1, 2]}, {"a": [1]})
    assert not contains({"a": 1}, {"a": 2})


NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"


def status(runtime: Runtime, previous=None, now=NOW, problems=(), foreign=()):
    return gateway_status(
        GW,
        problems=list(problems),
        foreign=list(foreign),
        runtime=runtime,
        previous=previous or {},
        now=now,
        cluster_domain="cluster.local",
    )


def conds(s):
    return {c["type"]: (c["status"], c["reason"]) for c in s["conditions"]}


def test_programmed_only_with_a_ready_replica_and_address() -> None:
    assert conds(status(Runtime()))["Programmed"] == ("False", "Pending")
    assert conds(status(Runtime(ready_replicas=1)))["Programmed"] == ("False", "Pending")
    assert conds(status(Runtime(cluster_ips=("10.0.0.1",))))["Programmed"] == ("False", "Pending")
    ready = status(Runtime(ready_replicas=1, cluster_ips=("10.0.0.1", "fd00::1")))
    assert conds(ready) == {
        "Accepted": ("True", "Accepted"),
        "Programmed": ("True", "Programmed"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    assert ready["addresses"] == [
        {"type": "IPAddress", "value": "10.0.0.1"},
        {"type": "IPAddress", "value": "fd00::1"},
        {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"},
    ]


def test_addresses_are_never_retracted_and_transition_time_is_kept() -> None:
    ready = status(Runtime(ready_replicas=1, cluster_ips=("10.0.0.1",)))
    again = status(Runtime(ready_replicas=1, cluster_ips=("10.0.0.1",)), previous=ready, now=LATER)
    assert again == ready
    down = status(Runtime(), previous=ready, now=LATER)
    assert down["addresses"] == ready["addresses"]
    programmed = next(c for c in down["conditions"] if c["type"] == "Programmed")
    assert programmed["lastTransitionTime"] == LATER
    accepted = next(c for c in down["conditions"] if c["type"] == "Accepted")
    assert accepted["lastTransitionTime"] == NOW
    assert all(c["observedGeneration"] == 1 for c in down["conditions"])


def test_problems_and_foreign_objects() -> None:
    bad = status(
        Runtime(ready_replicas=1, cluster_ips=("10.0.0.1",)),
        problems=[
            Problem(
                condition="ResolvedRefs",
                reason="InvalidParameters",
                message="ConfigMap shop/p does not exist",
            )
        ],
    )
    assert conds(bad) == {
        "Accepted": ("False", "InvalidParameters"),
        "Programmed": ("False", "Invalid"),
        "ResolvedRefs": ("False", "InvalidParameters"),
    }
    assert "addresses" not in bad
    foreign = status(
        Runtime(ready_replicas=1, cluster_ips=("10.0.0.1",)),
        foreign=["ServiceAccount shop/waypoint exists"],
    )
    assert conds(foreign)["Programmed"] == ("False", "Invalid")
    assert conds(foreign)["Accepted"] == ("True", "Accepted")
