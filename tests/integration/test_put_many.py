"""Batch puts over real gRPC: the agent's PutMany and the client's ``put_many``.

Agents run in-process on 127.0.0.1:0 and are called through the generated stubs; the client tests
add an in-process AMM, which ``put_many`` asks for the running workers when it spreads values. An
agent from before PutMany existed is the real servicer over a real node, with PutMany answering
UNIMPLEMENTED as it did then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import grpc
import pytest

from amm import AmmError, AsyncClient
from amm.base.checksum import checksum
from amm.batches import MESSAGE_BYTES
from amm.v1 import agent_pb2
from amm_service.api.server import AmmServer
from tests.support.agent import Stub, agents, dial, get, poll, put, running_agent
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig
from worker_agent.memory import PsutilProbe
from worker_agent.node import Node
from worker_agent.servicer import WorkerAgentServicer
from worker_agent.store import Key


def item(key: str, data: bytes, *, with_checksum: bool = True) -> agent_pb2.PutItem:
    return agent_pb2.PutItem(key=key, data=data, checksum=checksum(data) if with_checksum else "")


def message(items: Iterable[agent_pb2.PutItem]) -> agent_pb2.PutManyRequest:
    return agent_pb2.PutManyRequest(items=list(items))


async def put_many(stub: Stub, *messages: agent_pb2.PutManyRequest) -> agent_pb2.PutManyResponse:
    return await stub.PutMany(iter(messages))


async def failure(stub: Stub, *messages: agent_pb2.PutManyRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await put_many(stub, *messages)
    return err.value


def value(i: int) -> bytes:
    return f"value {i}".encode() * 10


# -- the agent ------------------------------------------------------------------------------------


async def test_many_keys_in_a_few_messages_are_stored_and_polled() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        assert "put-batches" in (await poll(stub)).features
        keys = [f"k-{i:05}" for i in range(20_000)]
        first, second = keys[:12_000], keys[12_000:]
        reply = await put_many(
            stub,
            message(item(k, value(i)) for i, k in enumerate(first)),
            message(item(k, value(i + 12_000), with_checksum=False) for i, k in enumerate(second)),
        )
        expected = sum(len(value(i)) for i in range(len(keys)))
        assert (reply.created, reply.unchanged, reply.bytes) == (20_000, 0, expected)
        assert len(agent.store) == 20_000
        assert agent.store.total_bytes == expected
        assert (await get(stub, "k-13000"))[1] == value(13_000)
        stored = agent.store.get(Key("k-19999"))
        assert stored is not None
        assert stored.checksum == checksum(value(19_999))
        snapshot = await poll(stub, full=True, max_keys=50_000)
        assert [k.key for k in snapshot.keys] == keys, "the key index is sorted"
        again = await put_many(stub, message(item(k, value(i)) for i, k in enumerate(first)))
        assert (again.created, again.unchanged, again.bytes) == (0, 12_000, 0)


async def test_an_incremental_poll_carries_the_batch() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        await put(stub, "m", b"middle")
        before = await poll(stub)
        await put_many(stub, message([item("z", b"1"), item("a", b"2"), item("n", b"3")]))
        after = await poll(stub, since_version=before.version, incarnation=agent.incarnation)
        assert not after.full
        assert sorted(k.key for k in after.keys) == ["a", "n", "z"]
        assert after.version == before.version + 3
        snapshot = await poll(stub, full=True)
        assert [k.key for k in snapshot.keys] == ["a", "m", "n", "z"]


async def test_an_empty_stream_and_empty_messages_store_nothing() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        reply = await put_many(stub)
        assert (reply.created, reply.unchanged, reply.bytes) == (0, 0, 0)
        reply = await put_many(stub, message([]), message([]))
        assert (reply.created, reply.unchanged, reply.bytes) == (0, 0, 0)
        assert len(agent.store) == 0


async def test_keys_are_immutable_within_and_across_messages() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        await put(stub, "held", b"one")
        same = await put_many(stub, message([item("held", b"one"), item("a", b"a")]))
        assert (same.created, same.unchanged) == (1, 1)
        twice = await put_many(stub, message([item("b", b"b"), item("b", b"b")]))
        assert (twice.created, twice.unchanged, twice.bytes) == (1, 1, 1)

        err = await failure(stub, message([item("c", b"c"), item("held", b"two")]))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "'held'" in (err.details() or "")
        assert "c" not in agent.store, "a bad message stores none of its values"

        err = await failure(stub, message([item("d", b"d"), item("e", b"1"), item("e", b"2")]))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "twice" in (err.details() or "")
        assert "d" not in agent.store
        assert "e" not in agent.store

        err = await failure(
            stub, message([item("f", b"f")]), message([item("g", b"g"), item("f", b"F")])
        )
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "f" in agent.store, "the values of earlier messages stay stored"
        assert "g" not in agent.store
        assert (await get(stub, "held"))[1] == b"one"


async def test_the_memory_limit_is_judged_for_the_whole_message() -> None:
    limits = {"memory_limit": 1000, "pause_fraction": None}
    async with running_agent(**limits) as agent, dial(agent.address) as stub:
        await put_many(stub, message([item("a", b"x" * 400)]))
        err = await failure(
            stub, message([item("b", b"y" * 300), item("c", b"z" * 301), item("a", b"x" * 400)])
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory limit" in (err.details() or "")
        assert set(agent.store) == {Key("a")}
        fits = await put_many(stub, message([item("b", b"y" * 300), item("c", b"z" * 300)]))
        assert (fits.created, fits.bytes) == (2, 600)
        assert agent.store.total_bytes == 1000


async def test_a_value_over_the_largest_accepted_is_refused() -> None:
    async with running_agent(max_value_bytes=100) as agent, dial(agent.address) as stub:
        err = await failure(stub, message([item("ok", b"x" * 100), item("big", b"x" * 101)]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "largest accepted" in (err.details() or "")
        assert len(agent.store) == 0
        reply = await put_many(stub, message(item(f"k{i}", b"x" * 100) for i in range(5)))
        assert reply.created == 5, "the cap applies to each value, not to their sum"


async def test_malformed_items_are_invalid_arguments_with_a_clear_message() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        cases = [
            (agent_pb2.PutItem(key="", data=b"x"), "item 1: the key must not be empty"),
            (agent_pb2.PutItem(key="k" * 1025, data=b"x"), "item 1: the key exceeds 1024 bytes"),
            (
                agent_pb2.PutItem(key="k", data=b"x", checksum="nope"),
                "item 1 ('k'): a checksum is 64",
            ),
            (
                agent_pb2.PutItem(key="k", data=b"x", checksum=checksum(b"y")),
                "item 1 ('k'): the value does not match its checksum",
            ),
        ]
        for bad, expected in cases:
            err = await failure(stub, message([item("fine", b"f"), bad]))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.details() or "").startswith(expected)
            assert "Traceback" not in (err.details() or "")
        assert len(agent.store) == 0
        upper = agent_pb2.PutItem(key="u", data=b"u", checksum=checksum(b"u").upper())
        assert (await put_many(stub, message([upper]))).created == 1


async def test_a_message_arriving_while_the_agent_stops_is_refused() -> None:
    """The values would be lost at exit: the client must hear so; earlier messages stay."""
    async with running_agent() as agent, dial(agent.address) as stub:
        requests: asyncio.Queue[agent_pb2.PutManyRequest | None] = asyncio.Queue()

        async def messages() -> AsyncIterator[agent_pb2.PutManyRequest]:
            while (request := await requests.get()) is not None:
                yield request

        call = stub.PutMany(messages())
        requests.put_nowait(message([item("early", b"e")]))
        await wait_for(lambda: "early" in agent.store, what="the first message stored")
        stopping = asyncio.create_task(agent.stop())
        await wait_for(lambda: agent.node.closing, what="closing")
        requests.put_nowait(message([item("late", b"l")]))
        requests.put_nowait(None)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (err.value.details() or "")
        finally:
            await stopping
        assert "late" not in agent.store
        assert "early" in agent.store


# -- the client -----------------------------------------------------------------------------------


class _BeforePutMany(WorkerAgentServicer):
    """The agent's servicer as it was before it served PutMany."""

    async def PutMany(
        self,
        request_iterator: AsyncIterator[agent_pb2.PutManyRequest],
        context: grpc.aio.ServicerContext[agent_pb2.PutManyRequest, agent_pb2.PutManyResponse],
    ) -> agent_pb2.PutManyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "PutMany is not served yet")
        raise AssertionError("unreachable")


@asynccontextmanager
async def older_agent() -> AsyncIterator[tuple[str, Node]]:
    """A standalone agent without PutMany: its address and its node."""
    node = Node(AgentConfig(amm=None), probe=PsutilProbe(), clock=time.monotonic)
    try:
        async with fake_peer(_BeforePutMany(node)) as address:
            node.address = address
            yield address, node
    finally:
        await node.close()


@asynccontextmanager
async def cluster(amm: AmmServer, n: int) -> AsyncIterator[tuple[AsyncClient, list[Agent]]]:
    """``n`` agents registered with ``amm``, and a client of it."""
    async with agents(n, amm=amm.address) as pairs:
        workers = [agent for agent, _ in pairs]
        async with AsyncClient(amm.address, timeout=10) as client:
            await wait_for(
                client.workers,
                lambda listed: {w.address for w in listed} == {a.address for a in workers},
                what="every agent registered",
            )
            yield client, workers


async def test_broadcast_stores_every_value_on_every_listed_worker(amm: AmmServer) -> None:
    items = {f"b-{i}": value(i) for i in range(5000)}
    big = bytes(range(256)) * (MESSAGE_BYTES // 256 + 1)
    async with cluster(amm, 3) as (client, workers):
        a, b, c = workers
        result = await client.put_many(
            [*items.items(), ("big", big)], workers=[a.address, b.address, a.address]
        )
        assert result.workers == (a.address, b.address)
        assert (result.created, result.unchanged) == (2 * 5001, 0)
        assert result.nbytes == 2 * (sum(map(len, items.values())) + len(big))
        for agent in (a, b):
            assert set(agent.store) == {Key(k) for k in [*items, "big"]}
        assert len(c.store) == 0
        assert await client.get("big", worker=b.address) == big
        again = await client.put_many(items, workers=b.address)
        assert (again.created, again.unchanged, again.nbytes) == (0, 5000, 0)
        holders = await client.who_has(["b-0", "big"])
        assert holders == {"b-0": tuple(sorted((a.address, b.address))), "big": holders["big"]}


async def test_without_workers_values_are_spread_round_robin(amm: AmmServer) -> None:
    async with cluster(amm, 3) as (client, workers):
        items = [(f"r-{i}", value(i)) for i in range(3001)]
        items.append(("r-7", value(7)))  # given twice: one worker judges both
        result = await client.put_many(items)
        assert (result.created, result.unchanged) == (3001, 1)
        assert sorted(result.workers) == sorted(a.address for a in workers)
        counts = sorted(len(agent.store) for agent in workers)
        assert counts == [1000, 1000, 1001]
        held = [k for agent in workers for k in agent.store]
        assert len(held) == len(set(held)) == 3001, "each key on exactly one worker"
        assert (await client.put_many({})).workers == ()


async def test_conflicts_and_bad_items_raise_amm_error(amm: AmmServer) -> None:
    async with cluster(amm, 1) as (client, [agent]):
        await client.put_many({"x": b"1"}, workers=agent.address)
        with pytest.raises(AmmError) as info:
            await client.put_many({"y": b"2", "x": b"other"}, workers=agent.address)
        assert info.value.status == grpc.StatusCode.ALREADY_EXISTS
        assert agent.address in info.value.message
        assert "y" not in agent.store
        with pytest.raises(AmmError) as info:
            await client.put_many({"z": "text"}, workers=agent.address)  # type: ignore[arg-type]
        assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(AmmError) as info:
            await client.put_many({"z": b"z"}, workers=[])
        assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_agent_without_put_many_gets_one_put_per_value(amm: AmmServer) -> None:
    items = {f"o-{i}": value(i) for i in range(100)}
    async with older_agent() as (old, node), cluster(amm, 1) as (client, [new]):
        result = await client.put_many(items, workers=[old, new.address])
        assert (result.created, result.unchanged) == (200, 0)
        assert set(node.store) == set(new.store) == {Key(k) for k in items}
        again = await client.put_many(items, workers=old)
        assert (again.created, again.unchanged) == (0, 100)
        with pytest.raises(AmmError) as info:
            await client.put_many({"o-1": b"other"}, workers=old)
        assert info.value.status == grpc.StatusCode.ALREADY_EXISTS
