"""Servers for faults a real agent or AMM cannot be made to produce (lying, slow, stuck, broken
peers): real grpc.aio servers on 127.0.0.1:0 running a small hand-written servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import grpc

from amm.v1 import agent_pb2_grpc, control_pb2_grpc


@asynccontextmanager
async def serving(add: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """A started server with what ``add`` registers; yields its address."""
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def fake_peer(servicer: agent_pb2_grpc.WorkerAgentServicer) -> AbstractAsyncContextManager[str]:
    """A hostile or slow agent; its address."""
    return serving(
        lambda server: agent_pb2_grpc.add_WorkerAgentServicer_to_server(servicer, server)
    )


def fake_amm(
    servicer: control_pb2_grpc.ActiveMemoryManagerServicer,
) -> AbstractAsyncContextManager[str]:
    """A stuck AMM; its address."""
    return serving(
        lambda server: control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server(servicer, server)
    )
