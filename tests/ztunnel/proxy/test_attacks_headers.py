"""Header-block attacks over real TLS (reliability.md §7 test 9).

CONTINUATION flood (CVE-2024-27316 class), oversized encoded header blocks and an HPACK bomb (a large
dynamic-table entry referenced many times): each must end the connection with a GOAWAY after at most 4
CONTINUATIONs / 16 KiB encoded / 16 KiB decoded, with no upstream work, bounded memory, and another
client unaffected.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.ztunnel.proxy.test_attacks_kit import (
    ENHANCE_YOUR_CALM,
    Attacker,
    legit_roundtrip,
    make_attack_lab,
    rss,
)

MiB = 2**20


async def _expect_goaway(lab, att, codes: set[int], reason: bytes, rss0: int, budget: int):
    goaway = await att.wait_goaway(5)
    assert goaway is not None, "no GOAWAY"
    assert goaway.error_code in codes, goaway
    assert reason in goaway.additional_data, goaway.additional_data
    assert await att.wait_closed(3), "server kept the connection open after GOAWAY"
    assert lab.calls == 1  # only the legitimate warm-up tunnel
    assert lab.dials == 1
    await legit_roundtrip(lab)
    assert rss() - rss0 < budget


async def test_continuation_flood_goaway_after_4():
    lab = await make_attack_lab()
    try:
        await legit_roundtrip(lab)
        rss0 = rss()
        att = await Attacker.connect(lab)
        block = att.block(att.connect_headers(lab.echo_authority))
        att.send(HeadersFrame(1, data=block[:2]))  # no END_HEADERS
        empty = ContinuationFrame(1, data=b"").serialize()
        for _ in range(100):  # 100,000 empty CONTINUATIONs, 1,000 per write
            if att.eof or att.goaway is not None:
                break
            att.send_raw(empty * 1000)
            await att.drain()
            await att.read_some(0.001)
        await _expect_goaway(
            lab, att, {ENHANCE_YOUR_CALM}, b"more than 4 CONTINUATIONs", rss0, 5 * MiB
        )
    finally:
        await lab.close()


@pytest.mark.parametrize(
    ("first", "chunk"),
    [(2, 16 * 1024), (2, 4096), (20_000, 0)],
    ids=["continuations-16KiB", "continuations-4KiB", "one-oversized-headers"],
)
async def test_oversized_header_block_goaway(first: int, chunk: int):
    """CONTINUATIONs totalling 10 MiB, or one 20 KB HEADERS: cut at 16 KiB before buffering."""
    lab = await make_attack_lab()
    try:
        await legit_roundtrip(lab)
        rss0 = rss()
        att = await Attacker.connect(lab)
        att.send(HeadersFrame(1, data=b"\x00" * first))
        sent = first
        while chunk and sent < 10 * MiB and not att.eof and att.goaway is None:
            att.send(*[ContinuationFrame(1, data=b"\x00" * chunk) for _ in range(16)])
            sent += 16 * chunk
            await att.drain()
            await att.read_some(0.001)
        await _expect_goaway(lab, att, {ENHANCE_YOUR_CALM}, b"exceeds the limit", rss0, 5 * MiB)
    finally:
        await lab.close()


async def test_hpack_bomb_rejected_by_decoded_size_cap():
    """One ~4 KiB table entry, then a block of 16,000 one-byte references (64 MB decoded)."""
    lab = await make_attack_lab()
    try:
        await legit_roundtrip(lab)
        rss0 = rss()
        att = await Attacker.connect(lab)
        big = ("x-bomb", "b" * 4000)  # 32 + 6 + 4000 bytes: fits the 4 KiB table we allow
        # Stream 1: a valid CONNECT that adds the entry (incremental indexing) -> index 62.
        att.send(
            HeadersFrame(
                1,
                data=att.block([*att.connect_headers(lab.echo_authority), big]),
                flags=["END_HEADERS"],
            )
        )
        prefix = att.block(att.connect_headers(lab.echo_authority))
        bomb = prefix + b"\xbe" * (16_000 - len(prefix))  # 0xbe: indexed field 62
        att.send(HeadersFrame(3, data=bomb, flags=["END_HEADERS"]))
        await att.drain()
        goaway = await att.wait_goaway(5)
        assert goaway is not None
        # h2 raises DenialOfServiceError for an oversized decoded list: ENHANCE_YOUR_CALM.
        assert goaway.error_code == ENHANCE_YOUR_CALM, goaway
        assert await att.wait_closed(3)
        assert 3 not in att.statuses()
        assert lab.calls <= 2  # the warm-up tunnel and at most the honest stream 1
        await legit_roundtrip(lab)
        assert rss() - rss0 < 5 * MiB
    finally:
        await lab.close()
