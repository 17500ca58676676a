"""The top-level layout and the dependency directions DESIGN.md promises."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_top_level_layout() -> None:
    for name in ("ztunnel", "waypoint", "netfilter", "tests", "e2e", "pyproject.toml", "README.md"):
        assert (ROOT / name).exists(), name


def test_netfilter_is_a_leaf() -> None:
    assert not _imports("netfilter") & {"ztunnel", "waypoint"}


def test_ztunnel_does_not_import_waypoint() -> None:
    assert "waypoint" not in _imports("ztunnel")
