"""The agent's side of the control API: registration, re-registration, WhoHas, unregistration.

The AMM here is a minimal real gRPC servicer that records what agents tell it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from amm.v1 import control_pb2, control_pb2_grpc
from tests.support.agent import agents, dial, get, poll, put, running_agent, wait_for

DATA = b"payload" * 100


class RecordingAmm(control_pb2_grpc.ActiveMemoryManagerServicer):
    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.registered: list[control_pb2.RegisterWorkerRequest] = []
        self.unregistered: list[str] = []
        self.holders: dict[str, list[str]] = {}

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        self.registered.append(request)
        interval = Duration()
        interval.FromNanoseconds(int(self.interval * 1e9))
        return control_pb2.RegisterWorkerResponse(epoch=3, interval=interval)

    async def UnregisterWorker(self, request: Any, context: Any) -> Any:
        self.unregistered.append(request.address)
        return control_pb2.UnregisterWorkerResponse(removed=True)

    async def WhoHas(self, request: Any, context: Any) -> Any:
        entries = [
            control_pb2.KeyHolders(key=key, workers=self.holders.get(key, []))
            for key in request.keys
        ]
        return control_pb2.WhoHasResponse(entries=entries)


def recording_amm(interval: float) -> RecordingAmm:
    """The servicer's other verbs stay UNIMPLEMENTED; the stub declares them abstract."""
    return RecordingAmm(interval)  # type: ignore[abstract]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serving_amm(amm: RecordingAmm, port: int = 0) -> AsyncIterator[str]:
    server = grpc.aio.server()
    control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server(amm, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        await server.stop(None)


async def test_registers_learns_the_epoch_and_unregisters_on_stop() -> None:
    amm = recording_amm(interval=10.0)
    async with serving_amm(amm) as address:
        async with running_agent(amm=address, name="w1") as agent, dial(agent.address) as stub:
            await wait_for(lambda: len(amm.registered), lambda n: n >= 1, what="registration")
            request = amm.registered[0]
            assert (request.address, request.name, request.incarnation) == (
                agent.address,
                "w1",
                agent.incarnation,
            )
            assert (await poll(stub)).epoch == 3
        assert amm.unregistered == [agent.address]


async def test_registration_retries_until_the_amm_is_up() -> None:
    port = free_port()
    amm = recording_amm(interval=10.0)
    async with (
        running_agent(amm=f"127.0.0.1:{port}", register_backoff_max=0.2) as agent,
        serving_amm(amm, port),
    ):
        await wait_for(lambda: agent.registered, what="registration after the AMM came up")
        assert len(amm.registered) == 1


async def test_registers_again_when_no_longer_polled() -> None:
    """An AMM that restarted and forgot the agent stops polling it: the agent comes back."""
    amm = recording_amm(interval=0.05)
    async with serving_amm(amm) as address, running_agent(amm=address):
        await wait_for(lambda: len(amm.registered), lambda n: n >= 3, what="re-registrations")
        incarnations = {request.incarnation for request in amm.registered}
        assert len(incarnations) == 1, "the same process registers again, same incarnation"


async def test_get_asks_the_amm_who_holds_a_missing_key() -> None:
    amm = recording_amm(interval=10.0)
    async with serving_amm(amm) as address, agents(2, amm=address) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        amm.holders["k"] = [b.address, a.address]
        header, data = await get(stub_b, "k")
        assert data == DATA
        assert header.replicated
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(stub_b, "nobody-has-it")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
