"""A Put to an agent that never announces it accepted the header (one older than
``PUT_ACCEPTED_METADATA``, or another language's that skips it).

The client waits ``PUT_ACCEPT_WAIT`` for the verdict on the header before it sends the chunks, so
a refusal is heard with nothing in flight; the wait is longer than an agent may take to judge a
header (it waits up to 5 s for a restarting AMM). A silent agent must not cost that wait on
every Put: the client waits for it once.

The agent here is a stand-in that speaks the contract's Put without the announcement; no agent of
this repository can be started without it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest

from amm import client as client_module
from amm.base.checksum import checksum
from amm.client import AsyncClient
from amm.v1 import agent_pb2, agent_pb2_grpc

#: The client's AMM: never dialled, since every Put names its worker.
UNUSED_AMM = "127.0.0.1:1"
WAIT = 2.0


class SilentAgent(agent_pb2_grpc.WorkerAgentServicer):
    """Stores nothing; answers a Put at its end, and notes how long its chunks took to come."""

    def __init__(self) -> None:
        self.chunk_delays: list[float] = []

    async def Put(
        self,
        request_iterator: AsyncIterator[agent_pb2.PutRequest],
        context: grpc.aio.ServicerContext[agent_pb2.PutRequest, agent_pb2.PutResponse],
    ) -> agent_pb2.PutResponse:
        header: agent_pb2.PutHeader | None = None
        began = time.monotonic()
        data = b""
        async for message in request_iterator:
            if message.WhichOneof("item") == "header":
                header, began = message.header, time.monotonic()
            else:
                if not data:
                    self.chunk_delays.append(time.monotonic() - began)
                data += message.chunk
        assert header is not None
        return agent_pb2.PutResponse(
            key=header.key, size=len(data), checksum=checksum(data), created=True
        )


async def test_a_silent_agent_is_waited_for_once_then_sent_chunks_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "PUT_ACCEPT_WAIT", WAIT)
    agent = SilentAgent()  # type: ignore[abstract]  # serves Put only
    server = grpc.aio.server()
    agent_pb2_grpc.add_WorkerAgentServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(UNUSED_AMM, timeout=30) as client:
            for i in range(3):
                await client.put(f"k{i}", b"v" * 1000, workers=f"127.0.0.1:{port}")
    finally:
        await server.stop(None)
    first, *later = agent.chunk_delays
    assert first >= WAIT * 0.9  # the first Put waited for a verdict that never came
    assert len(later) == 2
    assert all(delay < WAIT * 0.9 for delay in later), agent.chunk_delays
