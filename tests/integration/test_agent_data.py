"""The agent's data calls over real gRPC: Put, Get, Fetch, Pin, Unpin, Delete, Poll, bad input."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.base.streams import THREAD_HASH_BYTES, frame_chunk
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.support.agent import (
    Stub,
    agents,
    dial,
    fetch,
    get,
    poll,
    put,
    put_raw,
    running_agent,
)
from tests.support.faults import fake_peer, serving
from tests.support.waiting import wait_for
from worker_agent.config import AgentConfig
from worker_agent.memory import PsutilProbe
from worker_agent.node import Node
from worker_agent.servicer import WorkerAgentServicer
from worker_agent.store import Key

BIG = os.urandom(300_000)
#: More than gRPC and the sockets buffer: a reader that stops reading stalls the sender.
STALLING = 32 * 1024 * 1024


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def stream_code(stub: Stub, key: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(stub, key)
    return err.value.code()


VALUE_MESSAGES = (agent_pb2.GetResponse, agent_pb2.FetchResponse)


async def read_to_the_end(call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
    while isinstance(await call.read(), VALUE_MESSAGES):
        pass


async def test_put_get_fetch_round_trip_in_chunks() -> None:
    """Also: every finished read releases the key."""
    async with running_agent(chunk_size=64 * 1024) as agent, dial(agent.address) as stub:
        stored = await put(stub, "big", BIG, chunk_size=10_000)
        assert (stored.key, stored.size, stored.created) == ("big", len(BIG), True)
        assert stored.checksum == checksum(BIG)
        messages = [m async for m in stub.Get(agent_pb2.GetRequest(key="big"))]
        assert len(messages) == 1 + 5, "header, then 64 KiB chunks"
        header, data = await get(stub, "big")
        assert data == BIG
        assert (header.size, header.checksum, header.replicated) == (
            len(BIG),
            checksum(BIG),
            False,
        )
        header, data = await fetch(stub, "big", checksum(BIG))
        assert data == BIG
        await wait_for(lambda: agent.store.in_use(Key("big")), lambda n: n == 0, what="released")
        empty = await put(stub, "empty", b"")
        assert empty.size == 0
        assert (await get(stub, "empty"))[1] == b""


async def test_put_without_checksum_is_accepted_and_checksummed() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        stored = await put(stub, "k", b"data", with_checksum=False)
        assert stored.checksum == checksum(b"data")


async def test_keys_are_immutable() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        assert (await put(stub, "k", b"one")).created
        again = await put(stub, "k", b"one")
        assert not again.created
        assert again.checksum == checksum(b"one")
        assert await code_of(put(stub, "k", b"two")) == grpc.StatusCode.ALREADY_EXISTS
        assert await code_of(put(stub, "k", b"owt")) == grpc.StatusCode.ALREADY_EXISTS
        assert (await get(stub, "k"))[1] == b"one"


async def test_get_fetches_from_a_source_and_keeps_the_replica() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", BIG)
        header, data = await get(stub_b, "k", sources=["127.0.0.1:1", a.address])
        assert data == BIG
        assert header.replicated
        assert "k" in b.store
        header, data = await get(stub_b, "k")
        assert not header.replicated
        assert data == BIG
        await wait_for(lambda: b.store.in_use(Key("k")), lambda n: n == 0, what="reads released")
        assert (await stub_b.Delete(agent_pb2.DeleteRequest(key="k"))).deleted


async def test_get_of_an_unknown_key_without_sources_or_amm_is_not_found() -> None:
    async with agents(2) as [(a, stub_a), (_, stub_b)]:
        assert await stream_code(stub_a, "missing") == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(stub_b, "missing", sources=[a.address])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(stub_b, "missing", sources=["127.0.0.1:1"])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_bad_input_gets_the_right_status_codes() -> None:
    async with running_agent(max_value_bytes=1000) as agent, dial(agent.address) as stub:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert await code_of(put(stub, "", b"x")) == invalid
        assert await code_of(put(stub, "k" * 1025, b"x")) == invalid
        assert await code_of(put(stub, "é" * 513, b"x")) == invalid, "1026 bytes of UTF-8"
        assert (await put(stub, "k" * 1024, b"x")).created, "1024 bytes is the longest key"
        assert await code_of(put(stub, "big", b"x" * 1001)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        chunk_first = [agent_pb2.PutRequest(chunk=b"x")]
        assert await code_of(put_raw(stub, chunk_first)) == invalid
        assert await code_of(put_raw(stub, [])) == invalid
        header = agent_pb2.PutRequest(header=agent_pb2.PutHeader(key="k", size=3))
        short = [header, agent_pb2.PutRequest(chunk=b"xy")]
        assert await code_of(put_raw(stub, short)) == invalid
        long = [header, agent_pb2.PutRequest(chunk=b"xyzw")]
        assert await code_of(put_raw(stub, long)) == invalid
        twice = [header, header]
        assert await code_of(put_raw(stub, twice)) == invalid
        wrong_sum = agent_pb2.PutHeader(key="k", size=3, checksum=checksum(b"abc"))
        wrong = [agent_pb2.PutRequest(header=wrong_sum), agent_pb2.PutRequest(chunk=b"xyz")]
        assert await code_of(put_raw(stub, wrong)) == invalid
        assert "k" not in agent.store
        assert await stream_code(stub, "unknown") == grpc.StatusCode.NOT_FOUND
        assert await stream_code(stub, "") == invalid
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(stub, "unknown")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        pin = stub.Pin(agent_pb2.PinRequest(key="unknown"))
        assert await code_of(pin) == grpc.StatusCode.NOT_FOUND


async def test_values_in_large_chunks_are_verified_as_in_small_ones() -> None:
    """Chunks from THREAD_HASH_BYTES up are hashed in a thread while the next one arrives."""
    value = os.urandom(4 * THREAD_HASH_BYTES + 3)
    big = THREAD_HASH_BYTES + 1
    async with agents(2, chunk_size=big) as [(a, stub_a), (b, stub_b)]:
        stored = await put(stub_a, "k", value, chunk_size=big)
        assert (stored.size, stored.checksum) == (len(value), checksum(value))
        assert (await get(stub_a, "k"))[1] == value
        header, data = await get(stub_b, "k", sources=[a.address])
        assert (header.replicated, header.checksum, data == value) == (True, checksum(value), True)
        held = b.store.get(Key("k"))
        assert held is not None
        assert held.data == value, "the replica kept is the value"
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        lying = agent_pb2.PutHeader(key="other", size=len(value), checksum=checksum(b"x"))
        chunks = [value[i : i + big] for i in range(0, len(value), big)]
        wrong_sum = [agent_pb2.PutRequest(header=lying)]
        wrong_sum += [agent_pb2.PutRequest(chunk=c) for c in chunks]
        assert await code_of(put_raw(stub_a, wrong_sum)) == invalid
        short = agent_pb2.PutHeader(key="other", size=len(value) - 1)
        too_long = [agent_pb2.PutRequest(header=short)]
        too_long += [agent_pb2.PutRequest(chunk=c) for c in chunks]
        assert await code_of(put_raw(stub_a, too_long)) == invalid
        assert "other" not in a.store


async def test_a_chunk_message_with_a_field_unknown_to_the_agent_is_still_a_chunk() -> None:
    """Put reads chunks without protobuf when a message is exactly one chunk; any other encoding
    (here a field a later version of the contract might add) goes through protobuf."""
    value = os.urandom(100_000)
    header = agent_pb2.PutRequest(header=agent_pb2.PutHeader(key="k", size=len(value)))
    unknown = b"\x18\x07"  # field 3, a varint
    messages = [header.SerializeToString()]
    messages += [frame_chunk(value[:60_000]) + unknown, unknown + frame_chunk(value[60_000:])]
    async with running_agent() as agent:
        async with grpc.aio.insecure_channel(agent.address, options=CHANNEL_OPTIONS) as channel:
            raw_put = channel.stream_unary(
                "/amm.v1.WorkerAgent/Put",
                request_serializer=lambda raw: raw,
                response_deserializer=agent_pb2.PutResponse.FromString,
            )
            stored = await raw_put(iter(messages))
        assert (stored.size, stored.checksum) == (len(value), checksum(value))
        held = agent.store.get(Key("k"))
        assert held is not None
        assert held.data == value


async def test_a_servicer_registered_by_the_generated_function_serves_whole_values() -> None:
    """``add_to_server`` lets Get and Fetch write chunks already serialized; registered with the
    generated function instead (as a test's fake peer may be), the servicer writes protobuf
    messages and still reads every Put."""
    value = os.urandom(300_000)
    node = Node(
        AgentConfig(amm=None, chunk_size=64 * 1024), probe=PsutilProbe(), clock=time.monotonic
    )
    servicer = WorkerAgentServicer(node)
    try:
        async with (
            serving(
                lambda server: agent_pb2_grpc.add_WorkerAgentServicer_to_server(servicer, server)
            ) as address,
            dial(address) as stub,
        ):
            stored = await put(stub, "k", value, chunk_size=100_000)
            assert (stored.size, stored.checksum) == (len(value), checksum(value))
            header, data = await get(stub, "k")
            assert (header.size, data == value) == (len(value), True)
            assert (await fetch(stub, "k"))[1] == value
    finally:
        await node.close()


async def test_put_over_the_memory_limit_is_resource_exhausted() -> None:
    async with running_agent(memory_limit=1000) as agent, dial(agent.address) as stub:
        await put(stub, "a", b"x" * 600)
        assert await code_of(put(stub, "b", b"y" * 600)) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_fetch_with_another_checksum_is_not_found() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        await put(stub, "k", b"data")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(stub, "k", checksum(b"other"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pins_unpins_and_deletes() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        await put(stub, "k", b"data")
        assert (await stub.Pin(agent_pb2.PinRequest(key="k"))).pins == 1
        assert (await stub.Pin(agent_pb2.PinRequest(key="k"))).pins == 2
        delete = stub.Delete(agent_pb2.DeleteRequest(key="k"))
        assert await code_of(delete) == grpc.StatusCode.FAILED_PRECONDITION
        assert (await stub.Unpin(agent_pb2.UnpinRequest(key="k"))).pins == 1
        assert (await stub.Unpin(agent_pb2.UnpinRequest(key="k"))).pins == 0
        unpin = stub.Unpin(agent_pb2.UnpinRequest(key="k"))
        assert await code_of(unpin) == grpc.StatusCode.FAILED_PRECONDITION
        assert (await stub.Delete(agent_pb2.DeleteRequest(key="k"))).deleted
        assert not (await stub.Delete(agent_pb2.DeleteRequest(key="k"))).deleted
        assert "k" not in agent.store


async def test_poll_is_incremental_and_shows_pins() -> None:
    async with running_agent(name="w1") as agent, dial(agent.address) as stub:
        await put(stub, "a", b"1")
        await put(stub, "b", b"22")
        first = await poll(stub, epoch=7)
        assert first.full
        assert first.incarnation == agent.incarnation
        assert [(k.key, k.size) for k in first.keys] == [("a", 1), ("b", 2)]
        assert (first.name, first.epoch, first.status) == ("w1", 7, types_pb2.WORKER_STATUS_RUNNING)
        assert first.memory.managed_bytes == 3
        assert first.memory.process_bytes > 0
        assert first.memory.optimistic_bytes >= 3

        await put(stub, "c", b"333")
        await stub.Delete(agent_pb2.DeleteRequest(key="a"))
        await stub.Pin(agent_pb2.PinRequest(key="b"))
        since = {"since_version": first.version, "incarnation": first.incarnation}
        changes = await poll(stub, **since)
        assert not changes.full
        assert {k.key: k.pinned for k in changes.keys} == {"c": False, "b": True}
        assert list(changes.removed) == ["a"]
        assert changes.epoch == 7, "the newest epoch is remembered"

        unchanged = await poll(stub, since_version=changes.version, incarnation=agent.incarnation)
        assert (unchanged.full, list(unchanged.keys), unchanged.version) == (
            False,
            [],
            changes.version,
        )
        asked = await poll(stub, full=True, **since)
        assert asked.full
        assert sorted(k.key for k in asked.keys) == ["b", "c"]
        stranger = await poll(stub, since_version=first.version, incarnation="someone-else")
        assert stranger.full
        assert not list(stranger.removed)


async def test_forget_deletes_a_key_under_a_stalled_reader_who_still_gets_its_value() -> None:
    """A reader that stopped reading kept the key in use, so even Forget could not delete it."""
    value = os.urandom(STALLING)
    async with running_agent(chunk_size=64 * 1024) as agent, dial(agent.address) as stub:
        await put(stub, "k", value, chunk_size=1024 * 1024)
        reader = stub.Get(agent_pb2.GetRequest(key="k"))
        first = await reader.read()
        assert isinstance(first, agent_pb2.GetResponse)
        assert agent.store.in_use(Key("k")) == 1
        delete = stub.Delete(agent_pb2.DeleteRequest(key="k"))
        assert await code_of(delete) == grpc.StatusCode.FAILED_PRECONDITION, "a user delete waits"
        assert (await stub.Delete(agent_pb2.DeleteRequest(key="k", forget=True))).deleted
        assert "k" not in agent.store
        chunks = []
        while isinstance(message := await reader.read(), agent_pb2.GetResponse):
            chunks.append(message.chunk)
        assert first.header.checksum == checksum(value)
        assert b"".join(chunks) == value, "the reader's bytes are untouched"

        await put(stub, "pinned", b"data")
        await stub.Pin(agent_pb2.PinRequest(key="pinned"))
        forget = stub.Delete(agent_pb2.DeleteRequest(key="pinned", forget=True))
        assert await code_of(forget) == grpc.StatusCode.FAILED_PRECONDITION, "pins still bind"


async def test_a_reader_that_stops_reading_is_cut_off_and_releases_the_key() -> None:
    """Without a deadline per chunk, the key stayed in use (undroppable) for as long as the
    reader's connection lived."""
    value = os.urandom(STALLING)
    config = {"chunk_size": 64 * 1024, "stream_idle_timeout": 0.3}
    async with agents(2, **config) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", value, chunk_size=1024 * 1024)
        calls: list[grpc.aio.UnaryStreamCall[Any, Any]] = [
            stub_a.Get(agent_pb2.GetRequest(key="k")),
            stub_a.Fetch(agent_pb2.FetchRequest(key="k", requester=b.address)),
        ]
        for call in calls:
            assert isinstance(await call.read(), VALUE_MESSAGES), "the header"
        await wait_for(lambda: a.store.in_use(Key("k")), lambda n: n == 0, what="released")
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_to_the_end(call)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        header, data = await get(stub_b, "k", sources=[a.address])
        assert (header.replicated, data == value) == (True, True), "readers that read are served"


async def test_a_large_inventory_comes_in_pages_and_what_changed_meanwhile_follows() -> None:
    """One answer held the whole inventory, so past 16 MiB a worker could not be polled at all.
    The caller keeps the first page's version and polls since it once the last page is in."""
    async with running_agent() as agent, dial(agent.address) as stub:
        one = checksum(b"v")
        for i in range(25_000):  # setup only: 25,000 Puts would take a while
            agent.store.add(Key(f"key-{i:05d}"), b"v", one)
        pages = [await poll(stub)]  # max_keys 0: the agent's default, 10,000
        assert pages[0].full
        assert pages[0].next_cursor == "key-09999"
        # While paging: a key behind the cursor, one ahead, removals on both sides of it.
        await put(stub, "a-new", b"behind the cursor")
        await put(stub, "zzz-new", b"ahead of it")
        await stub.Delete(agent_pb2.DeleteRequest(key="key-00000"))
        await stub.Delete(agent_pb2.DeleteRequest(key="key-24999"))
        while pages[-1].next_cursor:
            pages.append(
                await poll(stub, cursor=pages[-1].next_cursor, incarnation=agent.incarnation)
            )
        assert [(len(p.keys), p.full, p.more) for p in pages] == [
            (10_000, True, False),
            (10_000, True, False),
            (5_000, True, False),
        ]
        paged = {k.key for p in pages for k in p.keys}
        assert "a-new" not in paged
        assert "zzz-new" in paged

        since = {"since_version": pages[0].version, "incarnation": agent.incarnation}
        follow = await poll(stub, **since)
        assert (follow.full, follow.more, follow.version) == (False, False, agent.store.version)
        assert {k.key for k in follow.keys} == {"a-new", "zzz-new"}
        assert set(follow.removed) == {"key-00000", "key-24999"}
        assert (paged | {k.key for k in follow.keys}) - set(follow.removed) == set(agent.store)

        # An incremental answer larger than max_keys comes in several, each complete up to its
        # version.
        for i in range(25):
            await put(stub, f"more-{i:02d}", b"x")
        answers: list[agent_pb2.PollResponse] = []
        version = follow.version
        while not answers or answers[-1].more:
            answers.append(
                await poll(stub, since_version=version, incarnation=agent.incarnation, max_keys=10)
            )
            version = answers[-1].version
        assert [(len(a.keys), a.full, a.more) for a in answers] == [
            (10, False, True),
            (10, False, True),
            (5, False, False),
        ]
        assert [a.version for a in answers] == [
            follow.version + 10,
            follow.version + 20,
            agent.store.version,
        ]
        assert [k.key for a in answers for k in a.keys] == [f"more-{i:02d}" for i in range(25)]


async def test_a_reader_that_cancels_mid_stream_ends_the_call_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The write in progress fails when the reader cancels; that is no error of the agent's."""
    caplog.set_level(logging.ERROR)
    async with running_agent(chunk_size=64 * 1024) as agent, dial(agent.address) as stub:
        await put(stub, "k", os.urandom(STALLING), chunk_size=1024 * 1024)
        for _ in range(3):
            reader = stub.Get(agent_pb2.GetRequest(key="k"))
            assert isinstance(await reader.read(), agent_pb2.GetResponse)
            # Not a wait for an outcome: the fault needs a write blocked on flow control, which
            # the sender reaches within a few milliseconds once the reader stops reading.
            await asyncio.sleep(0.1)
            reader.cancel()
            await wait_for(lambda: agent.store.in_use(Key("k")), lambda n: n == 0, what="released")
    # The agent stopped: every handler has finished, and logged what it would.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


class _GatedSource(agent_pb2_grpc.WorkerAgentServicer):
    """Forwards Fetch to a real agent once ``opened`` is set: a slow source."""

    def __init__(self, target: Stub) -> None:
        self.target = target
        self.asked = 0
        self.opened = asyncio.Event()

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        self.asked += 1
        await self.opened.wait()
        async for message in self.target.Fetch(request):
            yield message


async def test_a_get_that_fetches_serves_what_a_concurrent_put_stored() -> None:
    """A Put may store the key while a Get fetches it: the Get must stream what is stored (and
    say it replicated nothing), and refuse rather than stream other content under the key."""
    async with agents(2) as [(_, stub_a), (_, stub_b)]:
        await put(stub_a, "same", b"one")
        await put(stub_a, "other", b"one")
        gate = _GatedSource(stub_a)  # type: ignore[abstract]
        async with fake_peer(gate) as slow:
            same = asyncio.create_task(get(stub_b, "same", sources=[slow]))
            other = asyncio.create_task(get(stub_b, "other", sources=[slow]))
            await wait_for(lambda: gate.asked, lambda n: n == 2, what="both fetching")
            await put(stub_b, "same", b"one")
            await put(stub_b, "other", b"two")
            gate.opened.set()
            header, data = await same
            assert (header.replicated, data) == (False, b"one")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert (await get(stub_b, "other"))[1] == b"two"
