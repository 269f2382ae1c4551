"""The memory limit counts the bytes an agent is receiving and serving, not only those stored.

Issue 10: concurrent Puts took an agent limited to 64 MiB to 475 MiB, and unread reads of one
value held a copy each in gRPC's buffers. Values under way are reserved from the Put's header
(or the directive's size) until stored or abandoned; values served are bounded by a byte budget.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from amm import AsyncClient
from amm.base.checksum import checksum
from amm.errors import AmmError
from amm.v1 import agent_pb2
from tests.support.agent import (
    Stub,
    dial,
    directive_stream,
    get,
    put,
    reason,
    replicate,
    running_agent,
    status,
)
from tests.support.waiting import wait_for
from worker_agent.memory import ByteBudget

#: The client's AMM: never dialled, since every Put names its worker.
UNUSED_AMM = "127.0.0.1:1"
#: More than gRPC and the sockets buffer: a reader that stops reading stalls the sender.
STALLING = 32 * 1024 * 1024


class _Sending:
    """A Put whose messages the test sends one at a time."""

    def __init__(self, stub: Stub) -> None:
        self._queue: asyncio.Queue[agent_pb2.PutRequest | None] = asyncio.Queue()
        self.call = stub.Put(self._messages())

    async def _messages(self) -> AsyncIterator[agent_pb2.PutRequest]:
        while (message := await self._queue.get()) is not None:
            yield message

    def send(self, message: agent_pb2.PutRequest | None) -> None:
        self._queue.put_nowait(message)


def _header(key: str, data: bytes) -> agent_pb2.PutRequest:
    return agent_pb2.PutRequest(
        header=agent_pb2.PutHeader(key=key, size=len(data), checksum=checksum(data))
    )


async def test_a_put_under_way_counts_against_the_memory_limit() -> None:
    """Two Puts of 600 bytes on a 1000-byte agent: the second is refused while the first is
    still arriving (before: both headers judged 0 + 600 <= 1000, and 1200 bytes in flight)."""
    first, second = b"a" * 600, b"b" * 600
    async with running_agent(memory_limit=1000) as agent, dial(agent.address) as stub:
        sending = _Sending(stub)
        sending.send(_header("a", first))
        sending.send(agent_pb2.PutRequest(chunk=first[:100]))
        await wait_for(lambda: agent.store.in_flight_bytes == 600, what="the first Put reserved")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(stub, "b", second)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "being received or served" in (err.value.details() or "")
        sending.send(agent_pb2.PutRequest(chunk=first[100:]))
        sending.send(None)
        assert (await sending.call).created
        assert agent.store.in_flight_bytes == 0, "released once stored"
        assert agent.store.total_bytes == 600


async def test_an_abandoned_put_releases_its_reservation() -> None:
    data = b"a" * 600
    async with running_agent(memory_limit=1000) as agent, dial(agent.address) as stub:
        sending = _Sending(stub)
        sending.send(_header("a", data))
        await wait_for(lambda: agent.store.in_flight_bytes == 600, what="the Put reserved")
        sending.call.cancel()
        await wait_for(lambda: agent.store.in_flight_bytes == 0, what="the reservation released")
        await put(stub, "b", data)


async def test_a_put_refused_at_its_header_is_resource_exhausted_for_the_client() -> None:
    """Refused at its header while it would still send megabytes: the client (``amm``) sees the
    agent's status, never ``INTERNAL: Internal error from Core`` (grpc/grpc#36066), because it
    sends chunks only once the agent accepted the header."""
    value = os.urandom(8 * 1024 * 1024)
    async with (
        running_agent(memory_limit=12 * 1024 * 1024, pause_fraction=None) as agent,
        AsyncClient(UNUSED_AMM, timeout=60) as client,
    ):
        await client.put("held", value, workers=agent.address)
        results = await asyncio.gather(
            *(client.put(f"k{i}", value, workers=agent.address) for i in range(12)),
            return_exceptions=True,
        )
    errors = [r for r in results if isinstance(r, AmmError)]
    assert len(errors) == len(results), results
    assert {e.status for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, errors
    assert all("would exceed the memory limit" in e.message for e in errors), errors


async def test_a_put_sends_no_chunk_before_its_header_is_accepted() -> None:
    """The refused Put above leaves nothing of its value in flight: the agent received no chunk
    (before, every refused Put's client kept streaming its value)."""
    value = os.urandom(1024 * 1024)
    async with (
        running_agent(memory_limit=1024 * 1024 + 1000, pause_fraction=None) as agent,
        AsyncClient(UNUSED_AMM, timeout=60) as client,
    ):
        await client.put("held", value, workers=agent.address)
        received = agent.node.traffic.received["put"]
        with pytest.raises(AmmError) as err:
            await client.put("more", value, workers=agent.address)
        assert err.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert agent.node.traffic.received["put"] == received


async def test_a_replication_under_way_counts_against_the_memory_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A REPLICATE directive whose value is still arriving keeps a Put from taking its room."""
    value = os.urandom(600)
    async with (
        running_agent() as source,
        dial(source.address) as source_stub,
        running_agent(memory_limit=1000, pause_fraction=None) as target,
        dial(target.address) as stub,
        directive_stream(stub) as stream,
    ):
        await put(source_stub, "k", value)
        gate = asyncio.Event()
        fetch = target.node.peers.fetch

        async def slow_fetch(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await fetch(*args, **kwargs)

        monkeypatch.setattr(target.node.peers, "fetch", slow_fetch)
        await stream.send(replicate("k", value, [source.address]))
        await wait_for(lambda: target.store.in_flight_bytes == 600, what="the copy reserved")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(stub, "other", b"x" * 600)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        outcome = await stream.outcome()
        assert status(outcome) == "APPLIED", reason(outcome.reason)
        assert target.store.in_flight_bytes == 0


async def test_reads_beyond_the_serving_budget_wait_for_room() -> None:
    """A reader that stops reading holds the budget; the next read waits, and is served once the
    first ends (before: each read was served at once, a buffered copy each)."""
    value = os.urandom(STALLING)
    async with (
        running_agent(memory_limit=4 * STALLING, max_serving_bytes=STALLING) as agent,
        dial(agent.address) as stub,
        dial(agent.address) as other,
    ):
        await put(stub, "k", value, chunk_size=4 * 1024 * 1024)
        budget = agent.node.serving_budget
        stalled = stub.Get(agent_pb2.GetRequest(key="k"))
        await stalled.read()  # the header: the value is being served
        await wait_for(lambda: budget.used == STALLING, what="the stalled read charged")
        assert agent.store.in_flight_bytes == STALLING, "counted against the memory limit"
        second = asyncio.create_task(get(other, "k"))
        await wait_for(lambda: budget.waiting == 1, what="the second read waiting")
        assert not second.done()
        stalled.cancel()
        _, data = await asyncio.wait_for(second, 60)
        assert data == value
        await wait_for(lambda: budget.used == 0, what="the budget released")
        assert agent.store.in_flight_bytes == 0


async def test_a_byte_budget_refuses_after_its_patience_and_admits_a_large_amount_alone() -> None:
    budget = ByteBudget(100)
    assert budget.charge(500) == 100
    assert await budget.take(budget.charge(500), 1.0)
    assert not await budget.take(10, 0.05)
    budget.give_back(100)
    assert await budget.take(60, 0.05)
    assert not await budget.take(60, 0.05)
    unbounded = ByteBudget(0)
    assert await unbounded.take(unbounded.charge(10**12), 0.0)
