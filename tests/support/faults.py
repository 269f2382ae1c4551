"""Servers for faults a real agent or AMM cannot be made to produce (lying, slow, stuck, broken
peers): real grpc.aio servers on 127.0.0.1:0 running a small hand-written servicer, alone or
registered with a real in-process AMM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import NamedTuple

import grpc

from amm.v1 import agent_pb2_grpc, control_pb2_grpc
from amm_service.api.server import AmmServer
from amm_service.config import AmmConfig
from amm_service.runtime.manager import ActiveMemoryManager


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


class FakePeers(NamedTuple):
    amm: AmmServer
    manager: ActiveMemoryManager
    addresses: list[str]


@asynccontextmanager
async def amm_with_fake_peers(
    config: AmmConfig, peers: Mapping[str, agent_pb2_grpc.WorkerAgentServicer]
) -> AsyncIterator[FakePeers]:
    """A real in-process AMM with each fake peer registered under its name (its incarnation
    too), in order; the addresses in the same order."""
    async with AmmServer(config) as amm, AsyncExitStack() as peers_serving:
        manager = amm.manager
        assert manager is not None
        addresses = [
            await peers_serving.enter_async_context(fake_peer(servicer))
            for servicer in peers.values()
        ]
        for name, address in zip(peers, addresses, strict=True):
            await manager.register(address, name, name)
        yield FakePeers(amm, manager, addresses)


def fake_amm(
    servicer: control_pb2_grpc.ActiveMemoryManagerServicer,
) -> AbstractAsyncContextManager[str]:
    """A stuck AMM; its address."""
    return serving(
        lambda server: control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server(servicer, server)
    )
