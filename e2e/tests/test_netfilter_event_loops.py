"""Rule programming works whatever asyncio loop policy the calling process uses (uvloop included).

pyroute2 runs an event loop of its own; under a uvloop policy it once got a uvloop loop, which cannot
open netlink sockets. The benchmark and any uvloop-based process hit that first.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from e2e.netns import netns_path, netns_set
from netfilter import InpodConfig, program_pod, unprogram_pod, verify_pod


@pytest.fixture
def uvloop_policy():
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


@pytest.mark.usefixtures("uvloop_policy")
def test_program_verify_remove_under_uvloop_policy() -> None:
    cfg = InpodConfig()
    with netns_set() as nss:
        path = netns_path(nss.add_netns("uv"))

        async def cycle() -> list[object]:
            # From inside a running uvloop, as a ztunnel shell calls it (in a worker thread).
            await asyncio.to_thread(program_pod, path, cfg)
            drifts = await asyncio.to_thread(verify_pod, path, cfg)
            await asyncio.to_thread(unprogram_pod, path, cfg)
            return list(drifts)

        assert asyncio.run(cycle()) == []
