"""parse(live(render(rs))) == rs on a real kernel, for random rule sets, both backends.

The unit tests check the iptables parser against our own rendering and the nft parser against
captured JSON; this closes the loop: what the kernel tools print back for *any* model rule set
must parse to the same model. TPROXY is left out here (valid only in some hook contexts, which
random jumps would violate); the golden cases and lifecycle tests load it for real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from e2e.netns import netns_set, run
from netfilter.model import TProxy
from netfilter.parse import parse_iptables_save, parse_nft_json
from netfilter.render import to_iptables_restore, to_nft
from tests.netfilter.test_parse import rulesets

NO_TPROXY = rulesets().filter(lambda fr: not any(isinstance(r.target, TProxy) for r in fr[1].rules))


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    with netns_set() as nss:
        yield nss.add_netns("rt")


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(fam_rs=NO_TPROXY)
def test_nft_live_roundtrip(ns: str, fam_rs) -> None:
    family, rs = fam_rs
    try:
        run(["nft", "-f", "-"], netns=ns, input_text=to_nft(rs, "zt", families=(family,)))
        live = parse_nft_json(run(["nft", "-j", "list", "ruleset"], netns=ns).stdout, table="zt")
        assert live.foreign == ()
        assert live.ruleset == rs
    finally:
        run(["nft", "delete", "table", family.nft, "zt"], netns=ns, check=False)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(fam_rs=NO_TPROXY)
def test_iptables_live_roundtrip(ns: str, fam_rs) -> None:
    family, rs = fam_rs
    try:
        run(
            [f"{family.iptables}-restore", "--noflush"],
            netns=ns,
            input_text=to_iptables_restore(rs, family),
        )
        save = run([f"{family.iptables}-save"], netns=ns).stdout
        live = parse_iptables_save(save, family=family, prefix="ZT")
        assert live.foreign == ()
        assert live.ruleset == rs
    finally:
        for table in ("raw", "mangle", "nat"):
            run(["nft", "delete", "table", family.nft, table], netns=ns, check=False)
