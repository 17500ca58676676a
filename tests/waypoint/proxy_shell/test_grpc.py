"""gRPC (HTTP/2 prior knowledge) through the waypoint: unary, bidirectional streaming, L7 deny."""

from __future__ import annotations

import grpc
import pytest

from tests.waypoint.proxy_shell.harness import GRPC_VIP, Mesh, start_mesh

pytestmark = pytest.mark.timeout(60)

SERVICE = "echo.Echo"


async def grpc_factory(name: str):
    async def unary(request: bytes, context) -> bytes:
        return name.encode() + b":" + request

    async def chat(requests, context):
        async for message in requests:
            yield name.encode() + b":" + message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Chat": grpc.stream_stream_rpc_method_handler(chat),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def mesh():
    m = await start_mesh(grpc_factory)
    try:
        yield m
    finally:
        await m.close()


async def _channel(mesh: Mesh) -> grpc.aio.Channel:
    port = await mesh.forwarder(GRPC_VIP, 50051)
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_grpc_unary_and_streaming(mesh: Mesh) -> None:
    async with await _channel(mesh) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        seen = set()
        for i in range(20):
            reply = await unary(f"hi{i}".encode(), timeout=10)
            pod, _, text = reply.partition(b":")
            assert text == f"hi{i}".encode()
            seen.add(pod)
        assert seen == {b"pod-1", b"pod-2"}  # one HTTP/2 connection, spread per request

        chat = channel.stream_stream(f"/{SERVICE}/Chat")
        call = chat(timeout=10)
        replies = []
        for i in range(5):
            await call.write(f"m{i}".encode())
            replies.append(await call.read())  # interleaved: needs true streaming both ways
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert [r.partition(b":")[2] for r in replies] == [f"m{i}".encode() for i in range(5)]
        assert len({r.partition(b":")[0] for r in replies}) == 1
    assert mesh.requests_total(request_protocol="grpc", grpc_response_status="0") == 21


async def test_grpc_denied_is_permission_denied(mesh: Mesh) -> None:
    mesh.set_routes("""
authorizationPolicies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-unary, namespace: default}
  spec:
    targetRefs: [{kind: Service, group: "", name: grpc}]
    action: DENY
    rules: [{to: [{operation: {paths: ["/echo.Echo/Unary"]}}]}]
""")
    async with await _channel(mesh) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        call = channel.stream_stream(f"/{SERVICE}/Chat")(timeout=10)
        await call.write(b"ok")
        assert (await call.read()).endswith(b":ok")
        await call.done_writing()
    assert mesh.requests_total(request_protocol="grpc", grpc_response_status="7") == 1
