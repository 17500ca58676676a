"""One way to put a gRPC service of ours on a server: shared by the xDS server and the CA service.

A service subclass provides `rpc_handler()` and a `_service_name` for error messages; this base adds it to
an existing `grpc.aio.Server` or runs a server of its own (`start`/`stop`).
"""

from __future__ import annotations

import grpc


class GrpcService:
    """Base for our grpc.aio services: `add_to_server`, or `start`/`stop` a server of our own."""

    _service_name = "gRPC service"
    _server: grpc.aio.Server | None = None

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        raise NotImplementedError

    def add_to_server(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self.rpc_handler(),))

    async def start(
        self, address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None
    ) -> int:
        """Serve on `address` with a server of our own; returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"{self._service_name} already started")
        server = grpc.aio.server()
        self.add_to_server(server)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"{self._service_name} cannot bind {address}")
        await server.start()
        self._server = server
        return int(port)

    async def stop(self, grace: float | None = None) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
