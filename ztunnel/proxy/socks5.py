"""SOCKS5 outbound listener (Istio's 15080): an explicit entry point into the outbound path.

Owns the SOCKS5 subset Istio's ztunnel serves (RFC 1928): no authentication, ``CONNECT`` only, IPv4
and IPv6 destinations (domain names are refused with "address type not supported": this data plane
has no resolver). After the request the connection goes through exactly the outbound path of a
captured connection (``Outbound.proxy``); the SOCKS reply is sent once the upstream (tunnel or TCP
connection) is established, or a failure code if it was refused -- so a client sees a policy denial
as "connection not allowed by ruleset" and a closed connection.

``parse_greeting`` / ``parse_request`` / ``reply`` are pure; ``Socks5.handle`` does the socket I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

from ztunnel.proxy.outbound import Outbound
from ztunnel.proxy.socket_factory import Endpoint

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_HOST_UNREACHABLE = 0x04
REP_REFUSED = 0x05
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ATYP_NOT_SUPPORTED = 0x08

HANDSHAKE_TIMEOUT = 10.0


class Socks5Error(ValueError):
    """A malformed or unsupported SOCKS5 message; ``reply_code`` is what to answer (if anything)."""

    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class Incomplete(Exception):
    """More bytes are needed."""


@dataclass(frozen=True, slots=True)
class Request:
    destination: Endpoint
    consumed: int


def parse_greeting(data: bytes) -> tuple[bool, int]:
    """``(no_auth_offered, bytes consumed)``; raises Incomplete or Socks5Error."""
    if len(data) < 2:
        raise Incomplete
    if data[0] != VERSION:
        raise Socks5Error(f"SOCKS version {data[0]} is not 5")
    n = data[1]
    if n == 0:
        raise Socks5Error("SOCKS5 greeting offers no authentication method")
    if len(data) < 2 + n:
        raise Incomplete
    return NO_AUTH in data[2 : 2 + n], 2 + n


def parse_request(data: bytes) -> Request:
    """Parse ``VER CMD RSV ATYP ADDR PORT``; raises Incomplete or Socks5Error (with a reply code)."""
    if len(data) < 4:
        raise Incomplete
    ver, cmd, _rsv, atyp = data[:4]
    if ver != VERSION:
        raise Socks5Error(f"SOCKS version {ver} is not 5", REP_FAILURE)
    if atyp == ATYP_IPV4:
        end = 4 + 4 + 2
        if len(data) < end:
            raise Incomplete
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(data[4:8])
    elif atyp == ATYP_IPV6:
        end = 4 + 16 + 2
        if len(data) < end:
            raise Incomplete
        ip = ipaddress.IPv6Address(data[4:20])
    elif atyp == ATYP_DOMAIN:
        raise Socks5Error(
            "SOCKS5 domain-name destinations are not supported", REP_ATYP_NOT_SUPPORTED
        )
    else:
        raise Socks5Error(f"SOCKS5 address type {atyp} is unknown", REP_ATYP_NOT_SUPPORTED)
    if cmd != CMD_CONNECT:
        raise Socks5Error(f"SOCKS5 command {cmd} is not CONNECT", REP_COMMAND_NOT_SUPPORTED)
    (port,) = struct.unpack("!H", data[end - 2 : end])
    if port == 0:
        raise Socks5Error("SOCKS5 destination port 0", REP_FAILURE)
    return Request(Endpoint(ip, port), end)


def reply(code: int, bound: Endpoint | None = None) -> bytes:
    """A reply; the bound address is 0.0.0.0:0 unless given."""
    if bound is None:
        return bytes([VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
    atyp = ATYP_IPV6 if bound.ip.version == 6 else ATYP_IPV4
    return bytes([VERSION, code, 0, atyp]) + bound.ip.packed + struct.pack("!H", bound.port)


class Socks5:
    """SOCKS5 handling for one local workload, on top of its ``Outbound``."""

    def __init__(self, outbound: Outbound) -> None:
        self.outbound = outbound

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            destination = await asyncio.wait_for(self._handshake(client), HANDSHAKE_TIMEOUT)
        except (Socks5Error, OSError, TimeoutError, Incomplete):
            client.close()
            return
        if destination is None:
            client.close()
            return

        async def on_ready(ok: bool, _reason: str) -> None:
            code = REP_SUCCEEDED if ok else REP_NOT_ALLOWED
            await loop.sock_sendall(client, reply(code))

        await self.outbound.proxy(client, destination, on_ready=on_ready)

    async def _handshake(self, client: socket.socket) -> Endpoint | None:
        loop = asyncio.get_running_loop()
        buf = b""
        no_auth, used = False, 0
        while True:
            try:
                no_auth, used = parse_greeting(buf)
                break
            except Incomplete:
                chunk = await loop.sock_recv(client, 512)
                if not chunk:
                    return None
                buf += chunk
        if not no_auth:
            await loop.sock_sendall(client, bytes([VERSION, NO_ACCEPTABLE]))
            return None
        await loop.sock_sendall(client, bytes([VERSION, NO_AUTH]))
        buf = buf[used:]
        request: Request | None = None
        while request is None:
            try:
                request = parse_request(buf)
            except Incomplete:
                if len(buf) > 262:
                    raise Socks5Error("SOCKS5 request too long") from None
                chunk = await loop.sock_recv(client, 512)
                if not chunk:
                    return None
                buf += chunk
            except Socks5Error as err:
                if err.reply_code is not None:
                    await loop.sock_sendall(client, reply(err.reply_code))
                raise
        if len(buf) > request.consumed:
            # Early data after the request (before our reply) would be lost: refuse it.
            await loop.sock_sendall(client, reply(REP_FAILURE))
            return None
        return request.destination
