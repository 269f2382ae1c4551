"""A real grpc.aio server guarded by ``amm.base.security``: every amm RPC, health and reflection.

Every control and agent method is served by a trivial handler of the method's own streaming kind
(bytes in, bytes out) that answers with ``caller()`` as ``"<role> <name> <via>"``, so a test
sees both whether a call got through and who the server thought was calling. The server listens
twice on 127.0.0.1:0: a mutual-TLS port and a token port, as ``Security`` documents.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from amm.base.security import Authorizer, Security, caller
from amm.base.serving import HealthServicer
from amm.v1 import agent_pb2, control_pb2

#: (service, method, request streaming, response streaming) of every amm RPC.
METHODS: list[tuple[str, str, bool, bool]] = [
    (service.full_name, m.name, m.client_streaming, m.server_streaming)
    for module in (control_pb2, agent_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]
#: A method that has a handler but no rule: the authorizer must refuse it.
UNLISTED = ("amm.v1.Test", "Unlisted", False, False)


def full_name(service: str, method: str) -> str:
    return f"/{service}/{method}"


def describe() -> bytes:
    identity = caller()
    if identity is None:
        return b"-"
    return f"{identity.role.value} {identity.name} {identity.via}".encode()


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    # Yield to the loop between the check and the answer, so concurrent calls interleave.
    await asyncio.sleep(0)
    return describe()


async def _server_stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    await asyncio.sleep(0)
    yield describe()


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> bytes:
    async for _ in requests:
        pass
    return describe()


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield describe()


def _handler(request_streaming: bool, response_streaming: bool) -> grpc.RpcMethodHandler[Any, Any]:
    make: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    behavior: Callable[..., Any]
    if request_streaming:
        make, behavior = (
            (grpc.stream_stream_rpc_method_handler, _bidi)
            if response_streaming
            else (grpc.stream_unary_rpc_method_handler, _client_stream)
        )
    else:
        make, behavior = (
            (grpc.unary_stream_rpc_method_handler, _server_stream)
            if response_streaming
            else (grpc.unary_unary_rpc_method_handler, _unary)
        )
    return make(behavior)


def _generic_handlers() -> list[grpc.GenericRpcHandler[Any, Any]]:
    services: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for service, method, request_streaming, response_streaming in [*METHODS, UNLISTED]:
        services.setdefault(service, {})[method] = _handler(request_streaming, response_streaming)
    return [grpc.method_handlers_generic_handler(s, h) for s, h in services.items()]


@dataclass
class GuardedServer:
    """A started server; ``mtls`` and ``tokens`` are its two ``127.0.0.1:port`` addresses."""

    server: grpc.aio.Server
    authorizer: Authorizer
    mtls: str
    tokens: str


@contextlib.asynccontextmanager
async def guarded_server(
    folder: Security, identity: str = "amm", **options: Any
) -> AsyncIterator[GuardedServer]:
    """Serve every amm method, health and reflection as ``identity`` of the certs ``folder``,
    guarded by its authorizer (``options`` go to ``Authorizer``)."""
    security = folder.as_identity(identity)
    authorizer = security.authorizer(**options)
    server = grpc.aio.server(interceptors=[authorizer])
    server.add_generic_rpc_handlers(_generic_handlers())
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    names = sorted({service for service, *_ in METHODS})
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    mtls = server.add_secure_port("127.0.0.1:0", security.server_credentials())
    tokens = server.add_secure_port("127.0.0.1:0", security.token_server_credentials())
    await server.start()
    try:
        yield GuardedServer(server, authorizer, f"127.0.0.1:{mtls}", f"127.0.0.1:{tokens}")
    finally:
        await server.stop(0)


def channel(
    address: str, security: Security, options: list[tuple[str, str]] | None = None
) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, security.channel_credentials(), options=options)


async def invoke(
    ch: grpc.aio.Channel,
    service: str,
    method: str,
    request_streaming: bool = False,
    response_streaming: bool = False,
    deadline: float = 10.0,
) -> bytes:
    """Call one raw-bytes method of the kind given and return its (first) answer.

    A request stream's message may still be on its way when the server refuses the call, and
    grpc.aio then reports INTERNAL "Internal error from Core" instead of the server's status
    (grpc/grpc#36066): such a call is made again, at most twice, so that the status asserted is
    the server's.
    """
    for _ in range(2):
        try:
            return await _invoke(
                ch, service, method, request_streaming, response_streaming, deadline
            )
        except grpc.aio.AioRpcError as err:
            lost = err.code() == grpc.StatusCode.INTERNAL and err.details() == CORE_INTERNAL
            if not (request_streaming and lost):
                raise
    return await _invoke(ch, service, method, request_streaming, response_streaming, deadline)


#: What grpc.aio reports when a request stream's write loses the race with the server's answer.
CORE_INTERNAL = "Internal error from Core"


async def _invoke(
    ch: grpc.aio.Channel,
    service: str,
    method: str,
    request_streaming: bool,
    response_streaming: bool,
    deadline: float,
) -> bytes:
    name = full_name(service, method)
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    if request_streaming and response_streaming:
        bidi = ch.stream_stream(name, **raw)(iter([b""]), timeout=deadline)
        answers = [answer async for answer in bidi]
        return bytes(answers[0])
    if request_streaming:
        return bytes(await ch.stream_unary(name, **raw)(iter([b""]), timeout=deadline))
    if response_streaming:
        answers = [answer async for answer in ch.unary_stream(name, **raw)(b"", timeout=deadline)]
        return bytes(answers[0])
    return bytes(await ch.unary_unary(name, **raw)(b"", timeout=deadline))


async def running(ch: grpc.aio.Channel) -> bytes:
    """The simplest reader call: who the server thinks is calling."""
    return await invoke(ch, "amm.v1.ActiveMemoryManager", "Running")
