"""`ztunnel run` picks Kubernetes mode from the environment; flags override; bad settings fail clearly."""

from __future__ import annotations

import argparse
import logging

import pytest

from ztunnel import cli
from ztunnel.kube.mode import KubeConfigSource
from ztunnel.kube.provider import KubeLocalPods


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(["run", *argv])


MODES = [
    ("config-file", ("--config", "x.yaml", "--ca-dir", "ca"), {"XDS_ADDRESS": "http://cp:1"}, False),
    ("env-xds", ("--placement", "inpod"), {"XDS_ADDRESS": "http://cp:1"}, True),
    ("flag-xds", ("--xds-address", "http://cp:1"), {}, True),
    ("nothing", (), {}, False),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "env", "kube"), [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_mode_switch(argv: tuple[str, ...], env: dict[str, str], kube: bool) -> None:
    assert cli.kubernetes_mode(parse(*argv), env) is kube


def test_pieces_from_env_with_flag_overrides() -> None:
    args = parse("--node", "n9", "--ca-address", "http://ca:2", "--kubeconfig", "/k")
    pieces = cli._kube_pieces(args, {"XDS_ADDRESS": "http://cp:1", "NODE_NAME": "n1"})
    assert pieces["node"] == "n9"
    assert isinstance(pieces["source"], KubeConfigSource)
    assert pieces["source"].config.ca.target == "ca:2"
    assert pieces["source"].config.kubeconfig == "/k"
    assert isinstance(pieces["local_pods"], KubeLocalPods)
    assert pieces["rules"] is not None


FAILURES = [
    ("no-config-no-xds", (), {}, "give --config FILE, or set XDS_ADDRESS"),
    ("local-without-ca", ("--config", "x.yaml"), {}, "no certificate authority"),
    ("kube-with-ca-dir", ("--ca-dir", "d"), {"XDS_ADDRESS": "http://cp:1", "NODE_NAME": "n"}, "--ca-dir is for local mode"),
    ("kube-without-node", (), {"XDS_ADDRESS": "http://cp:1"}, "NODE_NAME is not set"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env", "message"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
async def test_start_up_errors(
    argv: tuple[str, ...],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for key in ("XDS_ADDRESS", "NODE_NAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.ERROR, logger="ztunnel"):
        assert await cli._run(parse(*argv)) == 1
    assert message in caplog.text
