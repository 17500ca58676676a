"""MadeYouReset (CVE-2025-8671) over real TLS: server-side resets provoked by the client.

reliability.md §7 test 8: provoke resets (WINDOW_UPDATE increment 0, DATA after END_STREAM, invalid
headers) on streams whose upstream is connected; each reset stream's upstream must be closed, and the
connection must get GOAWAY(ENHANCE_YOUR_CALM) after at most 1,024 local resets, while another client
keeps working.
"""

from __future__ import annotations

from hyperframe.frame import DataFrame, HeadersFrame, WindowUpdateFrame

from tests.ztunnel.proxy.test_attacks_kit import (
    ENHANCE_YOUR_CALM,
    Attacker,
    legit_roundtrip,
    make_attack_lab,
    rss,
    wait_for,
)

PER_KIND = 20
LOCAL_RESET_CAP = 1024


async def test_made_you_reset_closes_each_upstream_then_goaway():
    lab = await make_attack_lab()
    try:
        await legit_roundtrip(lab)
        rss0 = rss()
        att = await Attacker.connect(lab)
        sids = [att.open_stream(lab.sentinel_authority) for _ in range(3 * PER_KIND)]
        await att.drain()
        assert await att.until(lambda a: len(a.statuses()) == len(sids), 5)
        assert set(att.statuses().values()) == {"200"}
        await wait_for(lambda: lab.sentinel.live == len(sids), what="upstreams connected")

        zero_wu, after_end, bad_headers = (
            sids[:PER_KIND],
            sids[PER_KIND : 2 * PER_KIND],
            sids[2 * PER_KIND :],
        )
        for sid in zero_wu:
            att.send(WindowUpdateFrame(sid, window_increment=0))
        for sid in after_end:
            att.send(DataFrame(sid, data=b"x", flags=["END_STREAM"]), DataFrame(sid, data=b"y"))
        for sid in bad_headers:  # a second HEADERS (trailers) is not allowed on CONNECT (§8.5)
            block = att.block([(":method", "CONNECT"), ("x", "y")])
            att.send(HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]))
        await att.drain()
        assert await att.until(lambda a: set(sids) <= a.resets().keys(), 5), (
            f"not reset: {set(sids) - att.resets().keys()}"
        )
        assert att.goaway is None  # 60 local resets are well under the cap
        # Every reset stream's upstream socket is closed (the sentinel notices in ~50 ms).
        await wait_for(lambda: lab.sentinel.live == 0, 2, "upstreams of reset streams to close")
        await wait_for(lambda: len(lab.stats) == len(sids) + 1, 2, "tunnel tasks to finish")
        assert lab.dials == len(sids) + 1

        # Now cheap local resets (malformed CONNECTs, each answered 400 + RST) until GOAWAY.
        for _ in range(2 * LOCAL_RESET_CAP // 100):
            if att.eof or att.goaway is not None:
                break
            for _ in range(100):
                att.open_stream("", headers=[(":method", "GET"), (":authority", "a:1")])
            await att.drain()
            await att.read_some(0.01)
        goaway = await att.wait_goaway(5)
        assert goaway is not None, "no GOAWAY after 2x the local reset cap"
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert b"MadeYouReset" in goaway.additional_data
        bad = [sid for sid, status in att.statuses().items() if status == "400"]
        # 60 provoked + the 400s: the connection died at the first reset beyond the cap.
        assert len(sids) + len(bad) == LOCAL_RESET_CAP + 1
        assert lab.calls == len(sids) + 1  # malformed CONNECTs never reach on_connect
        assert lab.dials == len(sids) + 1
        assert await att.wait_closed(3)
        await legit_roundtrip(lab)
        assert rss() - rss0 < 20 * 2**20
    finally:
        await lab.close()


async def test_made_you_reset_while_decision_pending_cancels_before_dial():
    lab = await make_attack_lab()
    lab.decide_delay = 0.3
    try:
        att = await Attacker.connect(lab)
        sids = [att.open_stream(lab.sentinel_authority) for _ in range(PER_KIND)]
        await att.drain()
        await wait_for(lambda: lab.calls == len(sids), what="decisions to start")
        for sid in sids:
            att.send(WindowUpdateFrame(sid, window_increment=0))
        await att.drain()
        assert await att.until(lambda a: set(sids) <= a.resets().keys(), 5)
        await wait_for(lambda: len(lab.stats) == len(sids), 2, "decisions to be cancelled")
        assert all(s.status == 0 for s in lab.stats)
        assert lab.dials == 0
        assert lab.sentinel.opened == 0
        assert att.goaway is None
        await legit_roundtrip(lab)
    finally:
        await lab.close()
