"""Network namespaces and veth links with a per-run name prefix, removed again even after a failure.

Every namespace and link a test or the lab makes is named `<prefix>-...` where the prefix is unique to the
run (`zt<pid-ish hex>`), so parallel runs never collide and leftovers are easy to find and remove.
Kernel names are short (IFNAMSIZ 15), so keep the parts short.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from netfilter.netns import in_netns_thread

T = TypeVar("T")


def new_run_prefix() -> str:
    """A short prefix unique to this run: 'zt' + 4 hex digits (room for suffixes within 15 chars)."""
    return "zt" + secrets.token_hex(2)


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    input_text: str | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run a command (optionally inside a named netns) and return its completed process."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(full, input=input_text, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(full)}\n{proc.stderr.strip()}"
        )
    return proc


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


@dataclass
class NetnsSet:
    """Creates namespaces and veth pairs under one prefix; `cleanup()` removes all of them."""

    prefix: str = field(default_factory=new_run_prefix)
    namespaces: list[str] = field(default_factory=list)

    def add_netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "link", "set", "lo", "up"], netns=name)
        return name

    def add_veth(self, ns_a: str, if_a: str, ns_b: str | None, if_b: str) -> None:
        """Create a veth pair with one end in ns_a and the other in ns_b (None = the root netns)."""
        tmp_a, tmp_b = (
            f"{self.prefix}{secrets.token_hex(2)}",
            f"{self.prefix}{secrets.token_hex(2)}",
        )
        run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        run(["ip", "link", "set", tmp_a, "netns", ns_a])
        run(["ip", "link", "set", tmp_a, "name", if_a], netns=ns_a)
        if ns_b is not None:
            run(["ip", "link", "set", tmp_b, "netns", ns_b])
            run(["ip", "link", "set", tmp_b, "name", if_b], netns=ns_b)
        else:
            run(["ip", "link", "set", tmp_b, "name", if_b])
        run(["ip", "link", "set", if_a, "up"], netns=ns_a)
        if ns_b is not None:
            run(["ip", "link", "set", if_b, "up"], netns=ns_b)
        else:
            run(["ip", "link", "set", if_b, "up"])

    def cleanup(self) -> None:
        for name in reversed(self.namespaces):
            run(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()
        # Root-netns links carrying our prefix (bridges, veth ends) go too.
        links = run(["ip", "-o", "link", "show"], check=False).stdout.splitlines()
        for line in links:
            parts = line.split(":")
            if len(parts) > 1:
                ifname = parts[1].strip().split("@")[0]
                if ifname.startswith(self.prefix):
                    run(["ip", "link", "del", ifname], check=False)


@contextlib.contextmanager
def netns_set(prefix: str | None = None) -> Iterator[NetnsSet]:
    """Context manager yielding a NetnsSet that is cleaned up on exit, also on error."""
    nss = NetnsSet(prefix=prefix or new_run_prefix())
    try:
        yield nss
    finally:
        nss.cleanup()


def in_netns_env() -> dict[str, str]:
    """Environment for subprocesses started inside lab namespaces."""
    return dict(os.environ)


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a short-lived thread that has entered the netns at `path`; return its result.

    Sockets keep the namespace they were created in: `in_netns(p, lambda: socket.socket())` gives a
    socket living in that netns, usable from any thread. (netfilter.netns.in_netns_thread does it.)
    """
    return in_netns_thread(path, fn)
