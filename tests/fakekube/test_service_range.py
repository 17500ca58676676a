"""The fake API server's Service clusterIP allocator: a configurable range, in order, never reused."""

from __future__ import annotations

from typing import Any

import pytest

from e2e.fakekube import ApiError, FakeApiServer, Store

SERVICES = Store().registry.lookup("", "v1", "services")


def _create(store: Store, name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"port": 80}], **spec},
    }
    return store.create(SERVICES, "default", body, manager="test")


def test_default_range_starts_at_10_96_0_10() -> None:
    store = Store()
    assert str(store.service_cluster_ip_range) == "10.96.0.0/12"
    ips = [_create(store, f"s{i}")["spec"]["clusterIP"] for i in range(3)]
    assert ips == ["10.96.0.10", "10.96.0.11", "10.96.0.12"]


def test_configured_range_is_used_and_addresses_in_use_are_skipped() -> None:
    store = Store(service_cluster_ip_range="10.96.1.0/24")
    taken = _create(store, "fixed", clusterIP="10.96.1.11")
    assert taken["spec"]["clusterIPs"] == ["10.96.1.11"]
    ips = [_create(store, f"s{i}")["spec"]["clusterIP"] for i in range(2)]
    assert ips == ["10.96.1.10", "10.96.1.12"]
    headless = _create(store, "headless", clusterIP="None")
    assert headless["spec"]["clusterIP"] == "None"


def test_ipv6_range() -> None:
    store = Store(service_cluster_ip_range="fd00:10:96::/112")
    assert _create(store, "s")["spec"]["clusterIP"] == "fd00:10:96::a"


def test_a_full_range_is_a_clear_error() -> None:
    store = Store(service_cluster_ip_range="10.96.2.0/28")  # .10 to .14 (.15 is broadcast)
    for i in range(5):
        _create(store, f"s{i}")
    with pytest.raises(ApiError) as info:
        _create(store, "one-too-many")
    assert "10.96.2.0/28 is full" in str(info.value.status())


@pytest.mark.parametrize(
    ("cidr", "message"),
    [("10.96.0.0/33", "service_cluster_ip_range '10.96.0.0/33'"), ("10.96.0.0/29", "too small")],
    ids=["bad-prefix", "too-small"],
)
def test_bad_range_is_refused(cidr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Store(service_cluster_ip_range=cidr)


async def test_the_server_passes_the_range_to_its_store() -> None:
    server = FakeApiServer(service_cluster_ip_range="10.100.0.0/16")
    assert str(server.store.service_cluster_ip_range) == "10.100.0.0/16"
