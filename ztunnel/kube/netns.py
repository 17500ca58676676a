"""Find a pod's network namespace from its IP: runtime-pinned netns files, else a scan of /proc.

Owns the Kubernetes-mode answer to "where is this pod's netns" (issue 7 item 4). Istio gets the
netns from istio-cni over ZDS; here the node agent finds it itself:

1. the entries of the runtime's netns directory (``/var/run/netns``: containerd and CRI-O pin every
   pod sandbox's netns there), optionally narrowed by a name glob (containerd names them
   ``cni-<uuid>``; a glob keeps non-pod namespaces out);
2. if no entry holds the IP, every ``<HOST_PROC>/<pid>/ns/net`` (a process of the pod is in it).

A candidate is identified by its (st_dev, st_ino) and matches when one of its addresses is one of
the pod's IPs (``status.podIPs``); addresses are listed over netlink (pyroute2) from a thread that
entered the netns. Two different
namespaces holding the pod's IP is an error (never guess). Addresses are cached per netns id and
re-listed on a miss (an IP is added after the netns is created) and for the chosen one (the cache
must not hand out a namespace that lost the IP).

``choose`` is the pure decision; ``NetnsFinder`` does the I/O (blocking: call it from a thread).
"""

from __future__ import annotations

import ctypes
import fnmatch
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ztunnel.state.model import IPAddress

log = logging.getLogger(__name__)

NetnsId = tuple[int, int]
DEFAULT_NETNS_DIR = Path("/var/run/netns")
DEFAULT_HOST_PROC = Path("/proc")


class NetnsError(LookupError):
    """The pod's network namespace cannot be determined; the message names the pod."""


class NetnsNotFound(NetnsError):
    """No network namespace holds the pod's IP (yet); the message names the pod and where we looked."""


class NetnsAmbiguous(NetnsError):
    """Several different network namespaces hold the pod's IP; the message lists them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One network namespace file and the addresses configured inside it."""

    path: str
    netns_id: NetnsId
    addresses: frozenset[IPAddress]


def choose(candidates: Iterable[Candidate], ips: Sequence[IPAddress], what: str) -> Candidate:
    """The one netns holding any of ``ips``; the first path of a netns wins (candidates come in
    preference order: pinned files before /proc). ``what`` names the pod in errors."""
    wanted = set(ips)
    if not wanted:
        raise NetnsNotFound(f"{what}: has no IP to look for")
    found: dict[NetnsId, Candidate] = {}
    for cand in candidates:
        if cand.addresses & wanted and cand.netns_id not in found:
            found[cand.netns_id] = cand
    if not found:
        shown = ", ".join(str(ip) for ip in ips)
        raise NetnsNotFound(f"{what}: no network namespace holds {shown}")
    if len(found) > 1:
        paths = ", ".join(sorted(c.path for c in found.values()))
        raise NetnsAmbiguous(f"{what}: several network namespaces hold its IP: {paths}")
    return next(iter(found.values()))


def list_addresses(path: str, timeout: float = 10.0) -> frozenset[IPAddress]:
    """Every address configured in the netns at ``path`` (needs CAP_SYS_ADMIN to enter it).

    A short-lived thread enters the netns (setns moves only the calling thread) and asks over
    netlink with pyroute2 ``IPRoute``. Not pyroute2 ``NetNS``: it forks a helper, and forking a
    process that runs gRPC threads can crash the child.
    """
    result: list[frozenset[IPAddress]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            from pyroute2 import IPRoute  # lazy: the pure part above imports without netlink

            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out: set[IPAddress] = set()
            with IPRoute() as ipr:
                for msg in ipr.get_addr():
                    text = msg.get("address")
                    if text:
                        try:
                            out.add(ipaddress.ip_address(str(text).split("%")[0]))
                        except ValueError:
                            continue
            result.append(frozenset(out))
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=run, name=f"netns-addresses:{path}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise OSError(f"listing the addresses of {path} took longer than {timeout:.0f} s")
    if error:
        if isinstance(error[0], OSError):
            raise error[0]
        raise OSError(f"listing the addresses of {path} failed: {error[0]!r}")
    return result[0]


_CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def stat_id(path: str) -> NetnsId | None:
    """(st_dev, st_ino) of a netns file, None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class NetnsFinder:
    """Finds the netns of a pod by IP (see the module docstring). Blocking; not thread-safe."""

    def __init__(
        self,
        *,
        netns_dir: Path | None = DEFAULT_NETNS_DIR,
        host_proc: Path | None = DEFAULT_HOST_PROC,
        name_glob: str = "*",
        addresses_of: Callable[[str], frozenset[IPAddress]] = list_addresses,
        stat_id: Callable[[str], NetnsId | None] = stat_id,
    ) -> None:
        self.netns_dir = netns_dir
        self.host_proc = host_proc
        self.name_glob = name_glob or "*"
        self._addresses_of = addresses_of
        self._stat_id = stat_id
        self._cache: dict[NetnsId, frozenset[IPAddress]] = {}
        self.scans = 0  # address listings done (tests, metrics)

    def find(self, ips: Sequence[IPAddress], what: str) -> Candidate:
        """The netns holding ``ips``; raises NetnsNotFound / NetnsAmbiguous naming ``what``."""
        pinned = self._paths_in_dir()
        for refresh in (False, True):
            cands = self._candidates(pinned, refresh=refresh)
            try:
                return self._confirmed(choose(cands, ips, what), ips, what)
            except NetnsNotFound:
                continue
        if self.host_proc is not None:
            cands = self._candidates(self._paths_in_proc(), refresh=True)
            try:
                return self._confirmed(choose(cands, ips, what), ips, what)
            except NetnsNotFound:
                pass
        where = [str(self.netns_dir / self.name_glob)] if self.netns_dir is not None else []
        if self.host_proc is not None:
            where.append(f"{self.host_proc}/*/ns/net")
        shown = ", ".join(str(ip) for ip in ips)
        raise NetnsNotFound(
            f"{what}: no network namespace holds {shown} (looked in {', '.join(where)})"
        )

    def forget(self, netns_id: NetnsId) -> None:
        self._cache.pop(netns_id, None)

    # --- internals -------------------------------------------------------------------------

    def _confirmed(self, cand: Candidate, ips: Sequence[IPAddress], what: str) -> Candidate:
        # The cache may be old: make sure the chosen namespace still holds the IP.
        fresh = self._list(cand.path, cand.netns_id)
        if fresh is None or not fresh & set(ips):
            raise NetnsNotFound(f"{what}: {cand.path} no longer holds its IP")
        return Candidate(path=cand.path, netns_id=cand.netns_id, addresses=fresh)

    def _list(self, path: str, netns_id: NetnsId) -> frozenset[IPAddress] | None:
        try:
            addresses = self._addresses_of(path)
        except OSError as err:  # gone meanwhile, or not ours to enter (EACCES)
            log.debug("netns %s: cannot list addresses: %s", path, err)
            self._cache.pop(netns_id, None)
            return None
        self.scans += 1
        self._cache[netns_id] = addresses
        return addresses

    def _candidates(self, paths: Iterable[str], *, refresh: bool) -> list[Candidate]:
        out: list[Candidate] = []
        seen: set[NetnsId] = set()
        for path in paths:
            nsid = self._stat_id(path)
            if nsid is None or nsid in seen:
                continue
            seen.add(nsid)
            addresses = None if refresh else self._cache.get(nsid)
            if addresses is None:
                addresses = self._list(path, nsid)
            if addresses is not None:
                out.append(Candidate(path=path, netns_id=nsid, addresses=addresses))
        return out

    def _paths_in_dir(self) -> list[str]:
        if self.netns_dir is None:
            return []
        try:
            names = sorted(os.listdir(self.netns_dir))
        except OSError:
            return []
        return [
            str(self.netns_dir / name) for name in names if fnmatch.fnmatch(name, self.name_glob)
        ]

    def _paths_in_proc(self) -> list[str]:
        assert self.host_proc is not None
        try:
            pids = sorted(int(n) for n in os.listdir(self.host_proc) if n.isdigit())
        except OSError:
            return []
        return [str(self.host_proc / str(pid) / "ns" / "net") for pid in pids]
