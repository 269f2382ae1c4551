"""Batch puts over real gRPC: the agent's PutMany.

Agents run in-process on 127.0.0.1:0 and are called through the generated stubs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from amm.checksum import checksum
from amm.v1 import agent_pb2
from tests.support.agent import Stub, dial, get, poll, put, running_agent
from tests.support.waiting import wait_for
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
