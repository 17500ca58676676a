"""Control-frame and glitch floods over real TLS (reliability.md §7 test 10).

A client that never reads floods PING or SETTINGS (each forces an ACK, CVE-2019-9512/9515): the
server must close it once more than 1,000 provoked frames wait to be written, and then really release
the socket although the GOAWAY is never read. Floods of empty DATA, PRIORITY and stream-0
WINDOW_UPDATE frames (CVE-2019-9518/9513) must trip the glitch counter (GOAWAY ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, PingFrame, PriorityFrame, SettingsFrame, WindowUpdateFrame

from tests.ztunnel.proxy.test_attacks_kit import (
    ENHANCE_YOUR_CALM,
    Attacker,
    legit_roundtrip,
    make_attack_lab,
    rss,
    wait_for,
)
from ztunnel.hbone.guard import Limits, ListenerLimits

MiB = 2**20


@pytest.mark.parametrize(
    "frame",
    [PingFrame(0, opaque_data=b"12345678"), SettingsFrame(0, settings={0x3: 100})],
    ids=["ping", "settings"],
)
async def test_control_flood_from_non_reader_closed_at_queue_cap(frame):
    # Per-second control budget out of the way: this test is about the queue cap alone.
    lab = await make_attack_lab(
        limits=Limits(control_burst=10**9, control_refill_per_second=10**9),
        listener_limits=ListenerLimits(close_grace=0.2),
    )
    try:
        await legit_roundtrip(lab)
        rss0 = rss()
        att = await Attacker.connect(lab, rcvbuf=4096)  # and it never reads from here on
        await wait_for(lambda: len(lab.server._protocols) == 2, what="attacker connected")
        chunk = frame.serialize() * 50  # small writes: the cap is about output that piles up
        sent = 0
        loop_limit = 20_000  # 1,000,000 frames at most
        while lab.server.guard_trips.total() == 0 and loop_limit:
            loop_limit -= 1
            att.send_raw(chunk)
            sent += 50
            await att.drain()
        reasons = list(lab.server.guard_trips)
        assert reasons == ["control frames pile up while the peer does not read"], (reasons, sent)
        # The GOAWAY is never read; the socket is aborted after the close grace anyway.
        await wait_for(lambda: len(lab.server._protocols) == 1, 3, "attacker connection aborted")
        assert lab.server.connections_open == 1
        await legit_roundtrip(lab)
        assert lab.calls == 2
        assert rss() - rss0 < 10 * MiB
        att.close()
    finally:
        await lab.close()


async def test_control_flood_trips_glitches_with_default_budget():
    """With the default per-second PING budget a flood is cut long before any queue builds."""
    lab = await make_attack_lab()
    try:
        att = await Attacker.connect(lab)
        att.send(*[PingFrame(0, opaque_data=b"12345678") for _ in range(1000)])
        await att.drain()
        goaway = await att.wait_goaway(5)
        assert goaway is not None
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert b"glitches" in goaway.additional_data
        pings = sum(1 for f in att.frames if isinstance(f, PingFrame))
        assert pings <= 100 + 100 + 5  # the burst, then at most the glitch threshold
        await legit_roundtrip(lab)
    finally:
        await lab.close()


def _empty_data(att, lab):
    sid = att.open_stream(lab.echo_authority)
    return [DataFrame(sid, data=b"") for _ in range(1000)]


def _priority(att, lab):
    return [PriorityFrame(2 * i + 1, depends_on=0) for i in range(1000)]


def _window_update(att, lab):
    return [WindowUpdateFrame(0, window_increment=1) for _ in range(1000)]


@pytest.mark.parametrize(
    "make",
    [_empty_data, _priority, _window_update],
    ids=["empty-data", "priority", "window-update-0"],
)
async def test_glitch_floods_goaway(make):
    lab = await make_attack_lab()
    try:
        await legit_roundtrip(lab)
        rss0 = rss()
        att = await Attacker.connect(lab)
        batch = b"".join(f.serialize() for f in make(att, lab))
        for _ in range(100):  # up to 100,000 frames
            if att.eof or att.goaway is not None:
                break
            att.send_raw(batch)
            await att.drain()
            await att.read_some(0.001)
        goaway = await att.wait_goaway(5)
        assert goaway is not None, "no GOAWAY"
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert b"glitches" in goaway.additional_data
        assert await att.wait_closed(3)
        assert list(lab.server.guard_trips) == [goaway.additional_data.decode()]
        await legit_roundtrip(lab)
        assert rss() - rss0 < 10 * MiB
    finally:
        await lab.close()
