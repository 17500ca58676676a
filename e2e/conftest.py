"""End-to-end tests: real network namespaces, real rules, real processes.

They need root and the lab's tools. Outside CI a missing capability skips them; in CI (CI is set) it is a
failure, so they can never pass silently by not running.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_TOOLS = ("ip", "iptables", "iptables-restore", "nft", "nsenter")


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root (network namespaces, netfilter)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"end-to-end tests need these tools: {', '.join(missing)}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath) or str(item.fspath).startswith("e2e/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _e2e_capability(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("e2e") is None:
        return
    reason = _missing_capability()
    if reason is None:
        return
    if os.environ.get("CI") or os.environ.get("E2E_REQUIRED"):
        pytest.fail(f"{reason} (CI/E2E_REQUIRED is set, so this is a failure, not a skip)")
    pytest.skip(reason)
