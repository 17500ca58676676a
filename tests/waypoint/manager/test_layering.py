"""The manager's pure cores import no I/O; only `client` touches the Kubernetes client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import waypoint.manager

PACKAGE = Path(waypoint.manager.__file__).parent
PURE = [
    "__init__",
    "binding",
    "kinds",
    "kube",
    "model",
    "params",
    "plan",
    "render",
    "rootcert",
    "status",
]
FORBIDDEN = {
    "asyncio",
    "socket",
    "ssl",
    "subprocess",
    "pyroute2",
    "kubernetes",
    "kubernetes_asyncio",
    "aiohttp",
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", PURE)
def test_core_module_is_pure(module: str) -> None:
    assert not _imports(PACKAGE / f"{module}.py") & FORBIDDEN


def test_only_client_imports_the_kubernetes_client() -> None:
    users = {
        p.stem for p in PACKAGE.glob("*.py") if _imports(p) & {"kubernetes", "kubernetes_asyncio"}
    }
    assert users == {"client"}


def test_public_names() -> None:
    assert sorted(waypoint.manager.__all__) == waypoint.manager.__all__
    for name in waypoint.manager.__all__:
        assert hasattr(waypoint.manager, name), name
