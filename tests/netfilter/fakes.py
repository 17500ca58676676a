"""A tiny in-memory iptables (save/restore) for unit-testing the apply shell without root.

It understands exactly the restore input `netfilter.plan` writes: `*table`, `:CHAIN` (create or
flush), `-A`, `-D` (exact line), `-F`, `-X`, `COMMIT`; like iptables-nft it commits table by table,
and a `reject` substring makes the line fail (a kernel rejection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netfilter.executor import Call, ExecResult
from netfilter.model import BUILTIN_CHAINS, TABLES


@dataclass
class FakeIptables:
    # family tool prefix ("iptables"/"ip6tables") -> table -> chain -> lines ("-A CHAIN ...")
    state: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict)
    reject: str | None = None
    nft_ok: bool = False
    restores: list[str] = field(default_factory=list)

    def _tables(self, tool: str) -> dict[str, dict[str, list[str]]]:
        return self.state.setdefault(tool, {t: {c: [] for c in BUILTIN_CHAINS[t]} for t in TABLES})

    def save(self, tool: str) -> str:
        out: list[str] = []
        for table, chains in self._tables(tool).items():
            out.append(f"*{table}")
            for chain in chains:
                policy = "ACCEPT" if chain in BUILTIN_CHAINS[table] else "-"
                out.append(f":{chain} {policy} [0:0]")
            for lines in chains.values():
                out.extend(lines)
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def restore(self, tool: str, text: str) -> ExecResult:
        self.restores.append(text)
        committed = self._tables(tool)
        work: dict[str, list[str]] | None = None
        table = ""
        for n, line in enumerate(text.splitlines(), start=1):
            fail = ExecResult(returncode=2, stderr=f"{tool}-restore: line {n} failed")
            if self.reject and self.reject in line:
                return fail
            if line.startswith("*"):
                table = line[1:]
                work = {c: list(ls) for c, ls in committed[table].items()}
                continue
            assert work is not None
            if line == "COMMIT":
                committed[table] = work
                work = None
            elif line.startswith(":"):
                work[line[1:].split()[0]] = []
            elif line.startswith(("-A ", "-D ")):
                chain = line.split()[1]
                if chain not in work:
                    return fail
                body = "-A" + line[2:]
                if line.startswith("-A"):
                    work[chain].append(body)
                elif body in work[chain]:
                    work[chain].remove(body)
                else:
                    return fail
            elif line.startswith("-F "):
                work[line.split()[1]] = []
            elif line.startswith("-X "):
                name = line.split()[1]
                if work.get(name) or any(f"-j {name}" in x for ls in work.values() for x in ls):
                    return fail
                work.pop(name, None)
            else:
                return fail
        return ExecResult(returncode=0)

    def __call__(self, call: Call) -> ExecResult:
        argv = call.argv
        if argv[0] in ("iptables-save", "ip6tables-save"):
            return ExecResult(returncode=0, stdout=self.save(argv[0].removesuffix("-save")))
        if argv[0] in ("iptables-restore", "ip6tables-restore"):
            return self.restore(argv[0].removesuffix("-restore"), call.stdin or "")
        if argv[0] == "nft" and self.nft_ok:
            return ExecResult(returncode=0, stdout='{"nftables": []}')
        return ExecResult(returncode=1, stderr=f"{argv[0]}: not available in this fake")
