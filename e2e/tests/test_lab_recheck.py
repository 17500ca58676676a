"""The node agent's periodic recheck in the lab: a capture rule deleted by hand comes back.

The ztunnels run with a short ``--recheck-interval``; the client pod's outbound REDIRECT rule is
deleted inside its netns (as an operator or another tool might). Within a few intervals the
agent has verified, found the drift, rewritten the rule and counted it
(``workload_manager_rules_repaired_total``), and client -> server traffic still goes over HBONE
(mutual TLS seen by the server's ztunnel). Root and real namespaces (e2e).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2e.demo import curl, metric_sum
from e2e.lab.cluster import Lab
from netfilter import Backend, PodNetfilter
from netfilter.model import Family
from netfilter.render import iptables_command
from netfilter.rules import inpod_ruleset

RECHECK = 0.5  # seconds; Istio-like default is 30 s, far too slow for a test
REPAIR_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(ztunnel_args=["--recheck-interval", str(RECHECK)])
    try:
        lab.start_app("server", "http", 8080)
        yield lab
    finally:
        assert lab.down() == []


def delete_outbound_rule(lab: Lab, pod: str) -> None:
    """Delete the pod's v4 outbound REDIRECT (15001) rule by hand, whatever the backend."""
    rule = next(
        r
        for r in inpod_ruleset(lab.inpod).rules
        if r.family is Family.V4 and "outbound TCP" in r.comment
    )
    if PodNetfilter().backend(lab.inpod) is Backend.IPTABLES:
        lab.exec(pod, iptables_command(rule, "-D"), check=True)
        return
    listing = lab.exec(
        pod, ["nft", "-a", "list", "chain", "ip", "zt", "nat_ZT_OUTPUT"], check=True
    ).stdout
    handle = next(
        line.rsplit("# handle ", 1)[1].strip()
        for line in listing.splitlines()
        if "outbound TCP" in line
    )
    lab.exec(
        pod, ["nft", "delete", "rule", "ip", "zt", "nat_ZT_OUTPUT", "handle", handle], check=True
    )


def mtls_from_client(lab: Lab) -> float:
    return metric_sum(
        lab.metrics("n2"),
        "istio_tcp_connections_opened_total",
        source_workload="client",
        connection_security_policy="mutual_tls",
    )


def test_rule_deleted_by_hand_is_repaired_and_traffic_flows_over_hbone(lab: Lab) -> None:
    assert curl(lab, "client", f"http://{lab.ip('server')}:8080/").status == "200"
    repaired_before = metric_sum(lab.metrics("n1"), "workload_manager_rules_repaired_total")

    delete_outbound_rule(lab, "client")
    deadline = time.monotonic() + REPAIR_TIMEOUT
    repaired = repaired_before
    while time.monotonic() < deadline:
        repaired = metric_sum(lab.metrics("n1"), "workload_manager_rules_repaired_total")
        if repaired > repaired_before:
            break
        time.sleep(0.1)
    assert repaired == repaired_before + 1, "the recheck did not repair the deleted rule"
    assert lab.verify_rules() == []
    # Repair, not restart: the pod stayed up in the same ztunnel.
    state = lab.config_dump("n1")["workloadState"]
    assert all(s["state"] == "Up" for s in state.values())

    mtls_before = mtls_from_client(lab)
    call = curl(lab, "client", f"http://{lab.ip('server')}:8080/")
    assert call.status == "200", call
    assert f"you are {lab.ip('client')}:" in call.body
    end = time.monotonic() + 5
    while mtls_from_client(lab) <= mtls_before and time.monotonic() < end:
        time.sleep(0.05)
    assert mtls_from_client(lab) > mtls_before, "client -> server did not go over HBONE"
