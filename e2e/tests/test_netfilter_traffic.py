"""Real traffic through the capture rules: two namespaces joined by a veth, rules in the "pod" one.

Checks, for both backends (REDIRECT mode) and for IPv4 and IPv6:
* outbound TCP from the pod lands on the pod's 15001 listener, which reads the original
  destination with SO_ORIGINAL_DST;
* inbound TCP to a pod port lands on 15006 (original destination preserved), while 15008 is not
  redirected;
* a socket with SO_MARK 0x539 (what ztunnel uses) is not captured;
* ztunnel-style spoofing works: a transparent socket with the mark, bound to the peer's address,
  connects to the app, and the app's replies come back to it via connmark + policy routing.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from e2e.netns import in_netns, netns_path, netns_set, run
from netfilter.apply import PodNetfilter
from netfilter.model import Backend, InpodConfig

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36
TIMEOUT = 5.0


@dataclass
class Lab:
    pod: str
    peer: str
    pod_ip: str
    peer_ip: str
    family: socket.AddressFamily


def _v6_available() -> str | None:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"no IPv6 sockets: {exc}"
    return None


@pytest.fixture(params=["v4", "v6"])
def lab(request) -> Iterator[Lab]:
    v6 = request.param == "v6"
    if v6 and (reason := _v6_available()):
        pytest.skip(reason)
    with netns_set() as nss:
        pod, peer = nss.add_netns("pod"), nss.add_netns("peer")
        nss.add_veth(pod, "eth0", peer, "eth0")
        if v6:
            pod_ip, peer_ip, plen = "fd00:7a::1", "fd00:7a::2", 64
        else:
            pod_ip, peer_ip, plen = "10.250.0.1", "10.250.0.2", 24
        for ns, ip in ((pod, pod_ip), (peer, peer_ip)):
            extra = ["nodad"] if v6 else []
            run(["ip", "addr", "add", f"{ip}/{plen}", "dev", "eth0", *extra], netns=ns)
        yield Lab(
            pod=pod,
            peer=peer,
            pod_ip=pod_ip,
            peer_ip=peer_ip,
            family=socket.AF_INET6 if v6 else socket.AF_INET,
        )


def _sock(
    ns: str, lab: Lab, *, mark: int | None = None, transparent: bool = False
) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(lab.family, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if transparent:
            if lab.family == socket.AF_INET:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        if lab.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return s

    return in_netns(netns_path(ns), make)


def _listen(ns: str, lab: Lab, port: int) -> socket.socket:
    s = _sock(ns, lab)
    s.bind(("::" if lab.family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(8)
    return s


def _original_dst(conn: socket.socket, family: socket.AddressFamily) -> tuple[str, int]:
    if family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack_from("!2xH4s", raw)
        return str(ipaddress.IPv4Address(addr)), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port, addr = struct.unpack_from("!2xH4x16s", raw)
    return str(ipaddress.IPv6Address(addr)), port


def _pending(listener: socket.socket) -> bool:
    listener.settimeout(0.2)
    try:
        conn, _ = listener.accept()
    except (TimeoutError, BlockingIOError):
        return False
    conn.close()
    return True


@pytest.mark.parametrize("backend", [Backend.IPTABLES, Backend.NFT], ids=lambda b: b.value)
def test_capture_traffic(lab: Lab, backend: Backend) -> None:
    cfg = InpodConfig(backend=backend)
    nf = PodNetfilter()
    nf.program(netns_path(lab.pod), cfg)
    assert nf.verify(netns_path(lab.pod), cfg) == []
    out15001 = _listen(lab.pod, lab, 15001)
    in15006 = _listen(lab.pod, lab, 15006)
    hbone15008 = _listen(lab.pod, lab, 15008)
    app = _listen(lab.pod, lab, 7070)
    peer_srv = _listen(lab.peer, lab, 8081)
    opened: list[socket.socket] = [out15001, in15006, hbone15008, app, peer_srv]
    try:
        # Outbound: the app connects to the peer; 15001 gets it with the original destination.
        client = _sock(lab.pod, lab)
        opened.append(client)
        client.connect((lab.peer_ip, 8080))
        conn, _ = out15001.accept()
        opened.append(conn)
        assert _original_dst(conn, lab.family) == (lab.peer_ip, 8080)
        client.sendall(b"out")
        assert conn.recv(3) == b"out"

        # Inbound: the peer connects to a pod port; 15006 gets it, original destination kept.
        inbound = _sock(lab.peer, lab)
        opened.append(inbound)
        inbound.connect((lab.pod_ip, 9090))
        conn, (src, *_) = in15006.accept()
        opened.append(conn)
        assert src == lab.peer_ip
        assert _original_dst(conn, lab.family) == (lab.pod_ip, 9090)

        # HBONE port is a real listener: not redirected.
        hb = _sock(lab.peer, lab)
        opened.append(hb)
        hb.connect((lab.pod_ip, 15008))
        conn, _ = hbone15008.accept()
        opened.append(conn)
        assert conn.getsockname()[1] == 15008
        assert not _pending(in15006)

        # ztunnel's own sockets (SO_MARK 0x539) go straight out, uncaptured.
        marked = _sock(lab.pod, lab, mark=cfg.inpod_mark)
        opened.append(marked)
        marked.connect((lab.peer_ip, 8081))
        conn, (src, *_) = peer_srv.accept()
        opened.append(conn)
        assert src == lab.pod_ip
        assert not _pending(out15001)

        # Spoofed inbound as ztunnel does it: transparent + marked socket bound to the peer's
        # address connects to the app; the app's replies must come back to that socket (connmark
        # 0x111 restored in mangle OUTPUT, `ip rule fwmark 0x111 lookup 100`, local route).
        spoof = _sock(lab.pod, lab, mark=cfg.inpod_mark, transparent=True)
        opened.append(spoof)
        spoof.bind((lab.peer_ip, 0))
        spoof.connect((lab.pod_ip, 7070))
        conn, (src, *_) = app.accept()
        opened.append(conn)
        assert src == lab.peer_ip  # the app sees the real client address
        conn.sendall(b"reply")
        assert spoof.recv(5) == b"reply"
        spoof.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    finally:
        for s in opened:
            s.close()
    nf.unprogram(netns_path(lab.pod), cfg)
    assert "ZT_" not in run(["iptables-save"], netns=lab.pod).stdout
