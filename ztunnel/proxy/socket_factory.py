"""The socket factory: every listening and upstream socket the proxies use is made here.

Owns the pod-netns socket contract of Istio's ztunnel (ztunnel.md section 2):

* sockets can be created in the current network namespace (``DefaultSocketFactory``) or *inside* a
  given one (``NetnsSocketFactory``): a dedicated helper thread ``setns``'s into the pod netns once and
  creates every socket there. A socket keeps the namespace it was created in, so one process in one
  netns serves every pod, and the event loop thread never changes namespace;
* ``SO_MARK`` (``0x539`` for in-pod sockets, so the capture rules skip them; needs CAP_NET_ADMIN);
* ``SO_REUSEPORT`` on listeners (hitless restart: old and new ztunnel listen at once);
* ``IP_TRANSPARENT``/``IPV6_TRANSPARENT`` + ``IP_FREEBIND`` on upstream sockets that must carry the
  client's IP as source (inbound spoofing: bind to the client IP, port 0);
* TCP keepalive (180 s / 180 s / 9) and ``TCP_NODELAY`` on accepted and outgoing sockets;
* the original destination of a captured connection: ``SO_ORIGINAL_DST`` (v4, then v6) after a NAT
  REDIRECT, else the local address (TPROXY, or a listener bound on the destination itself);
* in a pod netns, a few spare upstream sockets per address family made ahead of time by the helper
  thread, so a dial only binds on the loop thread instead of waiting for a thread hop.

Every socket is created with ``proto=IPPROTO_TCP`` (``tcp_socket``): asyncio only sets TCP_NODELAY
on transports whose socket says so, and ``accept`` copies the listener's proto to accepted sockets.

Sockets are returned non-blocking, ready for ``asyncio`` (``loop.sock_connect``, ``start_server``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import ipaddress
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ztunnel.state.model import IPAddress

_T = TypeVar("_T")

# Linux constants the socket module does not (always) export.
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST has the same number on SOL_IPV6
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SO_MARK = getattr(socket, "SO_MARK", 36)
CLONE_NEWNET = 0x40000000

KEEPALIVE_TIME = 180
KEEPALIVE_INTERVAL = 180
KEEPALIVE_PROBES = 9
LISTEN_BACKLOG = 128
SPARE_UPSTREAM_SOCKETS = 3
"""Per address family, how many upstream sockets a NetnsSocketFactory keeps made in advance."""


class SocketSetupError(OSError):
    """A socket option or namespace switch the caller asked for failed; the message says which."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP and port (the socket-level counterpart of ``routing.SockAddr``)."""

    ip: IPAddress
    port: int

    def sockaddr(self) -> tuple[str, int]:
        return (str(self.ip), self.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


class SocketFactory(Protocol):
    """Makes the proxies' sockets; implementations decide the netns and the mark."""

    def listener(self, addr: Endpoint, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        """A bound, listening, non-blocking TCP socket (SO_REUSEPORT, SO_REUSEADDR)."""
        ...

    def upstream(
        self, family: socket.AddressFamily, *, source: IPAddress | None = None, spoof: bool = False
    ) -> socket.socket:
        """An unconnected non-blocking TCP socket, bound to ``source`` (port 0) when given.

        ``spoof`` asks for IP_TRANSPARENT + IP_FREEBIND so ``source`` may be a foreign address.
        """
        ...


def tcp_socket(family: socket.AddressFamily) -> socket.socket:
    """A TCP socket whose ``proto`` is IPPROTO_TCP (not 0).

    Why: asyncio's transports set TCP_NODELAY only when ``sock.proto == IPPROTO_TCP``, and an accepted
    socket inherits its listener's proto; with proto 0 small HTTP/2 writes wait for Nagle + delayed
    ACK (~40 ms)."""
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def configure_stream(sock: socket.socket) -> None:
    """NODELAY and keepalive, on accepted and outgoing connections alike."""
    with contextlib.suppress(OSError):  # e.g. a socketpair in tests: not TCP
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_TIME)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def family_of(ip: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class DefaultSocketFactory:
    """Sockets in the current network namespace; ``mark`` sets SO_MARK on every one of them.

    ``transparent_required``: fail when IP_TRANSPARENT cannot be set (in-pod mode); otherwise a
    spoofed bind falls back to a plain bind, which works for addresses the host owns (loopback mode).
    """

    def __init__(self, *, mark: int | None = None, transparent_required: bool = False) -> None:
        self.mark = mark
        self.transparent_required = transparent_required

    def listener(self, addr: Endpoint, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        return self._run(lambda: self._make_listener(addr, backlog))

    def upstream(
        self, family: socket.AddressFamily, *, source: IPAddress | None = None, spoof: bool = False
    ) -> socket.socket:
        return self._run(lambda: self._make_upstream(family, source, spoof))

    def _run(self, make: Callable[[], _T]) -> _T:
        return make()

    # -- creation (runs in the target netns) -------------------------------------------------

    def _make_listener(self, addr: Endpoint, backlog: int) -> socket.socket:
        sock = tcp_socket(family_of(addr.ip))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if addr.ip.version == 6:
                # [::] serves IPv4 too (dual stack), as ztunnel's listeners.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._apply_mark(sock, f"listener {addr}")
            try:
                sock.bind(addr.sockaddr())
            except OSError as err:
                raise SocketSetupError(err.errno, f"cannot bind listener {addr}: {err}") from None
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _make_upstream(
        self, family: socket.AddressFamily, source: IPAddress | None, spoof: bool
    ) -> socket.socket:
        sock = self._make_unbound(family)
        try:
            self._bind_source(sock, family, source, spoof)
        except BaseException:
            sock.close()
            raise
        return sock

    def _make_unbound(self, family: socket.AddressFamily) -> socket.socket:
        """A non-blocking upstream socket with NODELAY, keepalive and the mark; not bound yet."""
        sock = tcp_socket(family)
        try:
            configure_stream(sock)
            self._apply_mark(sock, "upstream socket")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_source(
        self,
        sock: socket.socket,
        family: socket.AddressFamily,
        source: IPAddress | None,
        spoof: bool,
    ) -> None:
        # setsockopt and bind act on the socket's own netns: safe from any thread.
        if source is None:
            return
        if spoof:
            self._set_transparent(sock, family)
        try:
            sock.bind((str(source), 0))
        except OSError as err:
            raise SocketSetupError(
                err.errno, f"cannot bind upstream socket to source {source}: {err}"
            ) from None

    def _apply_mark(self, sock: socket.socket, what: str) -> None:
        if self.mark is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        except OSError as err:
            raise SocketSetupError(
                err.errno, f"{what}: SO_MARK {self.mark:#x} failed (needs CAP_NET_ADMIN): {err}"
            ) from None

    def _set_transparent(self, sock: socket.socket, family: socket.AddressFamily) -> None:
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        except OSError as err:
            if self.transparent_required:
                raise SocketSetupError(
                    err.errno, f"IP_TRANSPARENT failed (needs CAP_NET_ADMIN): {err}"
                ) from None
            # Loopback mode without privileges: binding to a local address needs no transparency.


class NetnsSocketFactory(DefaultSocketFactory):
    """Sockets created inside the network namespace at ``netns_path`` (in-pod mode).

    A single helper thread enters the namespace once (``setns(CLONE_NEWNET)``) and creates every socket
    of this factory; the event loop's thread never changes namespace. Call ``close()`` when the pod
    goes away.

    ``upstream`` is on the dial path of every inbound tunnel, and a hop to the helper thread blocks
    the caller (measured p90 2 ms, max 9.5 ms under load). So the factory keeps ``spare`` sockets per
    address family made in advance by the helper thread (NODELAY, keepalive, mark set, not bound);
    ``upstream`` takes one, binds it on the calling thread (bind and setsockopt act on the socket's own
    netns) and asks the helper for a replacement. When none is left it falls back to the blocking hop.
    """

    def __init__(
        self,
        netns_path: str,
        *,
        mark: int | None = None,
        transparent_required: bool = True,
        spare: int = SPARE_UPSTREAM_SOCKETS,
    ) -> None:
        super().__init__(mark=mark, transparent_required=transparent_required)
        if spare < 0:
            raise ValueError(f"NetnsSocketFactory spare must be >= 0, got {spare}")
        self.netns_path = netns_path
        self.spare = spare
        self._entered = threading.Event()
        self._enter_error: BaseException | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns:{os.path.basename(netns_path)}",
            initializer=self._enter,
        )
        # Spare sockets are added by the helper thread and taken by callers: guarded by _lock.
        self._lock = threading.Lock()
        self._spares: dict[socket.AddressFamily, deque[socket.socket]] = {}
        self._refilling: dict[socket.AddressFamily, int] = {}
        self._broken: set[socket.AddressFamily] = set()  # creation failed: no more refills
        self._closed = False

    def _enter(self) -> None:
        try:
            fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self._enter_error = SocketSetupError(
                err.errno, f"cannot open network namespace {self.netns_path}: {err.strerror}"
            )
            return
        try:
            setns(fd, CLONE_NEWNET)
        except OSError as err:
            self._enter_error = SocketSetupError(
                err.errno,
                f"cannot enter network namespace {self.netns_path} (needs CAP_SYS_ADMIN): "
                f"{err.strerror}",
            )
        finally:
            os.close(fd)

    def _run(self, make: Callable[[], _T]) -> _T:
        # Socket creation is quick; blocking the caller for it keeps the API synchronous.
        return self._executor.submit(self._in_netns, make).result(timeout=10)

    def _in_netns(self, make: Callable[[], _T]) -> _T:
        if self._enter_error is not None:
            raise self._enter_error
        return make()

    # -- spare upstream sockets ----------------------------------------------------------------

    def listener(self, addr: Endpoint, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        sock = super().listener(addr, backlog=backlog)
        # A pod that listens is about to serve: have its first dials find a socket ready.
        self._refill(socket.AF_INET)
        if addr.ip.version == 6:
            self._refill(socket.AF_INET6)
        return sock

    def upstream(
        self, family: socket.AddressFamily, *, source: IPAddress | None = None, spoof: bool = False
    ) -> socket.socket:
        sock = self._take(family)
        if sock is None:
            sock = self._run(lambda: self._make_upstream(family, source, spoof))
            with self._lock:
                self._broken.discard(family)  # creation works (again): spares may too
            self._refill(family)
            return sock
        self._refill(family)
        try:
            self._bind_source(sock, family, source, spoof)
        except BaseException:
            sock.close()
            raise
        return sock

    def spare_count(self, family: socket.AddressFamily) -> int:
        """Sockets ready to be taken for ``family`` (for tests and the admin dump)."""
        with self._lock:
            return len(self._spares.get(family, ()))

    def _take(self, family: socket.AddressFamily) -> socket.socket | None:
        with self._lock:
            spares = self._spares.get(family)
            return spares.popleft() if spares else None

    def _refill(self, family: socket.AddressFamily) -> None:
        """Ask the helper thread for sockets until ``spare`` are ready or on their way."""
        with self._lock:
            if self._closed or family in self._broken:
                return
            missing = (
                self.spare - len(self._spares.get(family, ())) - self._refilling.get(family, 0)
            )
            if missing <= 0:
                return
            self._refilling[family] = self._refilling.get(family, 0) + missing
        for _ in range(missing):
            try:
                fut = self._executor.submit(self._in_netns, lambda: self._make_unbound(family))
            except RuntimeError:  # executor shut down by close() meanwhile
                return
            fut.add_done_callback(lambda f: self._add_spare(family, f))

    def _add_spare(
        self, family: socket.AddressFamily, fut: concurrent.futures.Future[socket.socket]
    ) -> None:
        # Runs on the helper thread (or at once, for a cancelled future).
        sock = None if fut.cancelled() or fut.exception() is not None else fut.result()
        with self._lock:
            self._refilling[family] -= 1
            if sock is None:
                self._broken.add(family)  # the blocking path reports the error to callers
                return
            if not self._closed:
                self._spares.setdefault(family, deque()).append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares = [s for q in self._spares.values() for s in q]
            self._spares.clear()
        for sock in spares:
            sock.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


_libc: ctypes.CDLL | None = None


def setns(fd: int, nstype: int) -> None:
    """``setns(2)`` for the calling thread (``os.setns`` only exists from Python 3.12)."""
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def original_destination(sock: socket.socket) -> Endpoint:
    """Where a captured connection was going: SO_ORIGINAL_DST (v4, then v6), else the local address.

    The local-address fallback is right for TPROXY (the socket's local address *is* the original
    destination) and for listeners bound on the destination itself.
    """
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return Endpoint(_packed_ip(packed), port)
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return Endpoint(_packed_ip(packed), port)
    return local_endpoint(sock)


def local_endpoint(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(parse_ip(host), port)


def peer_endpoint(sock: socket.socket) -> Endpoint:
    host, port = sock.getpeername()[:2]
    return Endpoint(parse_ip(host), port)


# The same few pod and node addresses recur on every connection; ``ipaddress`` parsing costs a few
# microseconds each time and the objects are immutable, so they are cached (bounded).
IP_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def parse_ip(text: str) -> IPAddress:
    """``text`` (as a socket reports it) as an IP address, IPv4-mapped IPv6 unmapped.

    Raises ValueError for something that is not an IP address (never cached)."""
    return unmap(ipaddress.ip_address(text))


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _packed_ip(packed: bytes) -> IPAddress:
    """4 or 16 packed bytes (SO_ORIGINAL_DST) as an IP address, IPv4-mapped IPv6 unmapped."""
    return unmap(ipaddress.ip_address(packed))


def unmap(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` (a dual-stack socket's view of an IPv4 peer) as plain IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
