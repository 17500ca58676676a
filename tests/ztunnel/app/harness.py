"""In-process harness: two ztunnels ("node-a", "node-b") on 127.0.0.0/8 addresses, an echo app, SOCKS5.

Every "pod" is an address in a random 127.X.Y.0/24 per test (so parallel runs do not meet); listeners
are in loopback mode on the pod's IP with Istio's fixed ports. No root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import struct
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ztunnel.app import App, AppConfig, LocalFileSource
from ztunnel.identity.ca import LocalCa, LocalCaClient
from ztunnel.sources.watch import LocalConfigWatcher

CA = LocalCa.generate()  # one CA for the module: key generation is the slow part


def random_prefix() -> str:
    rng = random.SystemRandom()
    return f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}"


def base_config(p: str, *, policies: str = "") -> str:
    """client (node-a, sa client) at p.1; server (node-b, sa server) at p.2; p.3 is outside the mesh.

    ``policies`` is a YAML list (unindented) that becomes the file's last section.
    """
    body = textwrap.dedent(
        f"""\
        workloads:
          - name: client
            namespace: default
            serviceAccount: client
            workloadIps: ["{p}.1"]
            protocol: HBONE
            node: node-a
            canonicalName: client-app
            canonicalRevision: v1
          - name: server
            namespace: default
            serviceAccount: server
            workloadIps: ["{p}.2"]
            protocol: HBONE
            node: node-b
            canonicalName: server-app
            canonicalRevision: v2
            services:
              default/server.default.svc.cluster.local: {{}}
        services:
          - name: server
            namespace: default
            hostname: server.default.svc.cluster.local
            vips: ["/{p}.200"]
            ports: {{80: 8080}}
        """
    )
    return body + with_policies(policies)


def with_policies(policies: str) -> str:
    if not policies.strip():
        return "policies: []\n"
    return "policies:\n" + textwrap.indent(policies, "  ")


@dataclass
class Echo:
    """A TCP echo app that remembers who connected."""

    host: str
    port: int
    peers: list[tuple[str, int]] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    hold: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[:2])
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class SocksRefused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 reply {code}")
        self.code = code


async def socks_connect(
    proxy: str, host: str, port: int, *, proxy_port: int = 15080
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect through a SOCKS5 proxy; raises SocksRefused with the reply code."""
    # The "app" in the client pod connects from the pod's own IP (the SOCKS listener's address).
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(proxy, proxy_port, local_addr=(proxy, 0)), 5
    )
    writer.write(b"\x05\x01\x00")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
    ip = ipaddress.ip_address(host)
    atyp = b"\x04" if ip.version == 6 else b"\x01"
    writer.write(b"\x05\x01\x00" + atyp + ip.packed + struct.pack("!H", port))
    try:
        head = await asyncio.wait_for(reader.readexactly(4), 10)
    except asyncio.IncompleteReadError as err:
        writer.close()
        raise SocksRefused(-1) from err
    rest = 16 + 2 if head[3] == 4 else 4 + 2
    await asyncio.wait_for(reader.readexactly(rest), 5)
    if head[1] != 0:
        writer.close()
        raise SocksRefused(head[1])
    return reader, writer


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, await resp.text()


async def post(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, await resp.text()


async def until(predicate, timeout: float = 3.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Mesh:
    prefix: str
    config_path: Path
    a: App
    b: App
    echo: Echo
    logs_a: list[str]
    logs_b: list[str]

    @property
    def client_ip(self) -> str:
        return f"{self.prefix}.1"

    @property
    def server_ip(self) -> str:
        return f"{self.prefix}.2"

    def set_policies(self, policies: str) -> None:
        text = self.config_path.read_text()
        self.write_config(text[: text.index("policies:")] + with_policies(policies))

    def write_config(self, text: str) -> None:
        # Write-and-rename: the watcher sees a new inode even within one mtime tick.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)


def app_config(path: Path, node: str, logs: list[str], **overrides: object) -> AppConfig:
    values: dict[str, object] = {
        "config_path": path,
        "node": node,
        "ca_client": LocalCaClient(CA),
        "admin_port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "readiness_host": "127.0.0.1",
        "readiness_port": 0,
        "drain_deadline": 2.0,
        "reload_interval": 0.05,
        "connect_timeout": 3.0,
        "access_log_sink": logs.append,
    }
    values.update(overrides)
    return AppConfig(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def mesh(
    tmp_path: Path, *, policies: str = "", b_overrides: dict[str, object] | None = None
) -> AsyncIterator[Mesh]:
    prefix = random_prefix()
    path = tmp_path / "mesh.yaml"
    path.write_text(base_config(prefix, policies=policies))
    logs_a: list[str] = []
    logs_b: list[str] = []
    echo = Echo(f"{prefix}.2", 8080)
    await echo.start()
    a = App(app_config(path, "node-a", logs_a))
    b = App(app_config(path, "node-b", logs_b, **(b_overrides or {})))
    started: list[App] = []
    try:
        for app in (a, b):
            await app.start()
            started.append(app)
        for app in (a, b):
            await until(lambda app=app: app.readiness.ready, 5, "readiness")
        yield Mesh(prefix, path, a, b, echo, logs_a, logs_b)
    finally:
        for app in started:
            if not app._stopped.is_set():
                app.drain.deadline = 0.2
                await asyncio.wait_for(app.stop("test teardown"), 10)
        await echo.close()


def watcher(app: App) -> LocalConfigWatcher:
    """The local-file watcher of an app that reads its config from a file."""
    assert isinstance(app.source, LocalFileSource)
    assert app.source.watcher is not None
    return app.source.watcher
