"""The waypoint process wiring: start from a CA directory and config file, reload, drain."""

from __future__ import annotations

import asyncio
import os

import pytest

from waypoint.proxy.app import AppOptions, WaypointApp
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId

pytestmark = pytest.mark.timeout(30)

MESH = """
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["10.96.0.10"]
  ports: {80: 8080}
"""
ROUTE = """
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: %s, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules: [{matches: [{path: {type: Exact, value: "%s"}}], backendRefs: [{name: echo, port: 80}]}]
"""


async def test_start_reload_and_drain(tmp_path) -> None:
    ca = LocalCa.generate("cluster.local")
    ca.save(tmp_path / "ca")
    config = tmp_path / "config.yaml"
    config.write_text(MESH)
    app = WaypointApp(
        AppOptions(
            config=config,
            identity=SpiffeId("cluster.local", "default", "waypoint"),
            ca_dir=tmp_path / "ca",
            gateway_name="waypoint",
            gateway_namespace="default",
            listen="127.0.0.1",
            hbone_port=0,
            metrics_port=0,
            readiness_port=0,
            reload_interval=3600,
        )
    )
    await app.start()
    try:
        assert app.readiness.ready
        assert app.proxy is not None
        assert app.watcher is not None
        # A good and a bad route: the bad one is reported, the good one applied.
        config.write_text(MESH + ROUTE % ("good", "/a") + (ROUTE % ("bad", "x")).split("\n", 2)[2])
        os.utime(config, ns=(1, 1))
        assert app.watcher.check_once() is True
        routes = app.proxy.config.routes.http_routes_for("Service", "default", "echo", 80)
        assert [r.name for r in routes] == ["good"]
        assert any("HTTPRoute default/bad" in e for e in app.watcher.sources.errors)
        assert app.telemetry.value("waypoint_config_rejected_objects", {"source": "all"}) == 1
        # A broken store part keeps the previous configuration.
        config.write_text("services: [{name: x}]\n")
        assert app.watcher.check_once() is False
        assert app.store.service_by_key("default/echo.default.svc.cluster.local") is not None
    finally:
        await asyncio.wait_for(app.drain(), 10)
    assert app.stopped.is_set()
