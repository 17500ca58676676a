"""Parsing and validation of Gateways (model) and parametersRef ConfigMaps (params)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.manager.model import ModelError, parse_gateway, validate_gateway
from waypoint.manager.params import Params, ParamsError, parse_params

from .helpers import configmap, gateway


def test_typical_gateway_is_valid() -> None:
    gw = parse_gateway(gateway())
    assert validate_gateway(gw) == []
    assert gw.mesh_listener() is not None
    assert gw.infra_labels is None


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda g: g["metadata"].pop("name"), r"metadata.name is required"),
        (lambda g: g["spec"].pop("gatewayClassName"), r"spec.gatewayClassName is required"),
        (
            lambda g: g["spec"]["listeners"][0].update(port="15008"),
            r"spec.listeners\[0\].port must be an integer",
        ),
        (lambda g: g["spec"].update(listeners="mesh"), r"spec.listeners must be a list"),
        (
            lambda g: g["spec"]["listeners"][0]["allowedRoutes"]["namespaces"].update(
                {"from": "Some"}
            ),
            r"allowedRoutes.namespaces.from must be Same, All or Selector",
        ),
        (lambda g: g["metadata"].update(labels={"a": 1}), r"metadata.labels.a must be a string"),
        (
            lambda g: g["spec"].update(infrastructure={"parametersRef": {"name": "x"}}),
            r"parametersRef.kind is required",
        ),
    ],
    ids=[
        "no-name",
        "no-class",
        "string-port",
        "listeners-not-list",
        "bad-from",
        "label-not-string",
        "pref-without-kind",
    ],
)
def test_malformed_gateway_names_the_field(mutate, match) -> None:
    obj = gateway()
    mutate(obj)
    with pytest.raises(ModelError, match=match) as info:
        parse_gateway(obj)
    assert (
        "Gateway shop/" in str(info.value)
        or "Gateway <unnamed>" in str(info.value)
        or "Gateway" in str(info.value)
    )


@pytest.mark.parametrize(
    ("kwargs", "reason", "listener_reason"),
    [
        (
            {"listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
            "ListenersNotValid",
            "UnsupportedProtocol",
        ),
        (
            {"listeners": [{"name": "mesh", "port": 15009, "protocol": "HBONE"}]},
            "ListenersNotValid",
            "PortUnavailable",
        ),
        ({"listeners": []}, "ListenersNotValid", None),
        (
            {
                "listeners": [
                    {"name": "a", "port": 15008, "protocol": "HBONE"},
                    {"name": "b", "port": 15008, "protocol": "HBONE"},
                ]
            },
            "ListenersNotValid",
            "PortUnavailable",
        ),
        ({"class_name": "istio-mesh"}, "InvalidParameters", None),
        ({"labels": {"istio.io/waypoint-for": "everything"}}, "InvalidParameters", None),
    ],
    ids=[
        "protocol",
        "port",
        "no-listener",
        "two-listeners",
        "sa-form-without-account",
        "bad-waypoint-for",
    ],
)
def test_invalid_gateways(kwargs, reason, listener_reason) -> None:
    problems = validate_gateway(parse_gateway(gateway(**kwargs)))
    assert problems, kwargs
    assert problems[0].reason == reason
    assert problems[0].listener_reason == listener_reason


def test_spec_addresses_other_than_one_ip_are_refused() -> None:
    obj = gateway()
    obj["spec"]["addresses"] = [{"type": "Hostname", "value": "x.example"}]
    assert validate_gateway(parse_gateway(obj))[0].reason == "UnsupportedAddress"


def test_service_account_form_is_accepted() -> None:
    gw = parse_gateway(
        gateway(class_name="istio-mesh", annotations={"istio.io/service-account": "reviews"})
    )
    assert validate_gateway(gw) == []
    assert gw.for_service_account == "reviews"


def test_default_params() -> None:
    p = parse_params(configmap("p"))
    assert p == Params()
    assert (
        p.min_replicas,
        p.max_replicas,
        p.autoscaling,
        p.pod_disruption_budget,
        p.min_available,
    ) == (2, 10, True, True, 1)


def test_all_typed_keys() -> None:
    p = parse_params(
        configmap(
            "p",
            minReplicas="3",
            maxReplicas="9",
            autoscaling="true",
            cpuTargetUtilization="off",
            requestsPerSecondTarget="100",
            requestsPerSecondMetric="waypoint_rps",
            scaleDownStabilizationSeconds="900",
            scaleDownPods="2",
            scaleDownPeriodSeconds="120",
            disruptionBudget="true",
            minAvailable="2",
            resources="requests: {cpu: 1}",
            terminationGracePeriodSeconds="300",
            image="example/wp:1",
        )
    )
    assert p.cpu_target_utilization is None
    assert p.requests_per_second_target == 100
    assert p.requests_per_second_metric == "waypoint_rps"
    assert p.resources == {"requests": {"cpu": "1"}}
    assert p.image == "example/wp:1"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"maxReplicas": "lots"}, r'ConfigMap shop/p key "maxReplicas": must be an integer'),
        ({"minReplicas": "0"}, r'key "minReplicas": must be >= 1'),
        (
            {"minReplicas": "5", "maxReplicas": "3"},
            r"minReplicas \(5\) is greater than maxReplicas \(3\)",
        ),
        ({"autoscaling": "maybe"}, r'key "autoscaling": must be true or false'),
        ({"cpuTargetUtilization": "150"}, r"between 1 and 100"),
        ({"cpuTargetUtilization": "off"}, r"autoscaling needs a metric"),
        ({"terminationGracePeriodSeconds": "5"}, r"must be between 30 and 3600"),
        ({"replicas": "3"}, r'key "replicas": unknown key; allowed keys are'),
        ({"deployment": "[1, 2]"}, r'key "deployment": must be a YAML mapping'),
        ({"deployment": "spec: ["}, r'key "deployment": not valid YAML'),
        ({"resources": "requests: 1"}, r"requests must be a mapping"),
        ({"resources": "wants: {cpu: 1}"}, r"unknown section 'wants'"),
        (
            {"autoscaling": "false", "horizontalPodAutoscaler": "spec: {}"},
            r"autoscaling=false disables",
        ),
        (
            {"minReplicas": "2", "minAvailable": "2"},
            r"minAvailable \(2\) must be less than minReplicas",
        ),
        ({"requestsPerSecondMetric": "rate(x[1m])"}, r"Prometheus metric name"),
        ({"image": "a b"}, r"without spaces"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(v) if isinstance(v, dict) else None,
)
def test_bad_configmap_values_name_configmap_and_key(data, match) -> None:
    with pytest.raises(ParamsError, match=match):
        parse_params(configmap("p", **data))


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "minReplicas",
                "maxReplicas",
                "autoscaling",
                "minAvailable",
                "cpuTargetUtilization",
                "bogus",
                "deployment",
            ]
        ),
        st.text(max_size=12),
    )
)
def test_parse_params_fuzz_raises_only_params_error(data) -> None:
    message = ""
    try:
        params = parse_params(configmap("p", **data))
    except ParamsError as exc:
        message = str(exc)
    else:
        assert params.min_replicas <= params.max_replicas
        return
    assert "ConfigMap shop/p" in message
