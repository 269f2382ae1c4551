"""Peer transfers over the bulk port (``worker_agent.bulk``): real agents on loopback, and hostile
sources whose bulk port sends other bytes, too few, or cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from amm.base.checksum import checksum
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.support.agent import (
    agents,
    dial,
    directive_stream,
    put,
    reason,
    replicate,
    running_agent,
    status,
)
from tests.support.faults import fake_peer
from worker_agent import bulk
from worker_agent.bulk import BulkServer, fresh_bytes
from worker_agent.store import Key
from worker_agent.transfer import Fetched, Peers

#: Larger than a send and a hash step, and not a multiple of either.
DATA = os.urandom(9 * 1024 * 1024 + 123)


def _peers(**overrides: Any) -> Peers:
    return Peers(**{"bulk": True, "fetch_timeout": 10.0, "max_value_bytes": 1 << 30, **overrides})


async def test_replication_between_plain_agents_goes_over_the_bulk_port() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("k", DATA, [a.address]))
        assert status(outcome) == "APPLIED", outcome.message
        assert a.node.bulk is not None
        assert a.node.bulk.sent == 1
        value = b.store.get(Key("k"))
        assert value is not None
        assert value.data == DATA
        assert value.checksum == checksum(DATA)
        assert a.node.traffic.sent["fetch"] == len(DATA)


async def test_an_agent_without_the_bulk_port_streams_chunks_to_one_that_asks() -> None:
    """An older source (or one that turned it off) ignores ``FetchRequest.bulk``."""
    async with running_agent(bulk=False) as a, dial(a.address) as stub_a:
        await put(stub_a, "k", DATA)
        assert a.node.bulk is None
        peers = _peers()
        try:
            got = await peers.fetch(
                Key("k"), [a.address], expected_size=None, expected_checksum="", requester="t"
            )
        finally:
            await peers.close()
        assert isinstance(got, Fetched)
        assert got.data == DATA


async def test_a_bulk_port_that_cannot_be_reached_falls_back_to_chunks() -> None:
    async with running_agent() as a, dial(a.address) as stub_a:
        await put(stub_a, "k", DATA)
        assert a.node.bulk is not None
        await a.node.bulk.close()  # still offered, nobody listens
        peers = _peers()
        try:
            for _ in range(2):
                got = await peers.fetch(
                    Key("k"),
                    [a.address],
                    expected_size=len(DATA),
                    expected_checksum="",
                    requester="t",
                )
                assert isinstance(got, Fetched)
                assert got.data == DATA
        finally:
            await peers.close()


class _BulkLiar(agent_pb2_grpc.WorkerAgentServicer):
    """A source whose header announces ``DATA`` and whose bulk port sends ``sent`` instead."""

    def __init__(self, server: BulkServer, sent: bytes) -> None:
        self.server = server
        self.sent = sent

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        header = types_pb2.ValueHeader(key=request.key, size=len(DATA), checksum=checksum(DATA))
        offer = self.server.offer(self.sent)
        offered = agent_pb2.BulkOffer(port=offer.port, ticket=offer.ticket)
        yield agent_pb2.FetchResponse(header=header, bulk=offered)
        try:
            await offer.sent(claim_timeout=5.0)
        except bulk.BulkError:
            pass
        finally:
            offer.revoke()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (_flip(DATA, len(DATA) - 1), ("REFUSED", "CHECKSUM_MISMATCH")),
        (_flip(DATA, 0), ("REFUSED", "CHECKSUM_MISMATCH")),
        (DATA[:-1], ("FAILED", "SOURCE_UNAVAILABLE")),
    ],
    ids=["last-byte-flipped", "first-byte-flipped", "one-byte-short"],
)
async def test_bytes_from_a_bulk_port_that_do_not_match_are_never_stored(
    sent: bytes, expected: tuple[str, str]
) -> None:
    server = await BulkServer.start("127.0.0.1", idle_timeout=5.0)
    try:
        liar = _BulkLiar(server, sent)  # type: ignore[abstract]
        async with fake_peer(liar) as source, running_agent() as b, dial(b.address) as stub_b:
            async with directive_stream(stub_b) as amm:
                outcome = await amm.run(replicate("k", DATA, [source]))
            assert (status(outcome), reason(outcome)) == expected, outcome.message
            assert "k" not in b.store
    finally:
        await server.close()


async def test_a_ticket_is_good_for_one_connection_only() -> None:
    server = await BulkServer.start("127.0.0.1", idle_timeout=5.0)
    try:
        offer = server.offer(DATA)
        sent = asyncio.create_task(offer.sent(claim_timeout=5.0))
        data, digest = await bulk.receive("127.0.0.1", offer.port, offer.ticket, len(DATA), 5.0)
        await sent
        assert (data, digest) == (DATA, checksum(DATA))
        with pytest.raises(bulk.BulkError, match="closed after 0"):
            await bulk.receive("127.0.0.1", offer.port, offer.ticket, len(DATA), 5.0)
        assert server.sent == 1
    finally:
        await server.close()


async def test_an_unclaimed_offer_lapses() -> None:
    server = await BulkServer.start("127.0.0.1", idle_timeout=5.0)
    try:
        offer = server.offer(DATA)
        with pytest.raises(bulk.BulkError, match="not claimed"):
            await offer.sent(claim_timeout=0.05)
        offer.revoke()
        with pytest.raises(bulk.BulkError):
            await bulk.receive("127.0.0.1", offer.port, offer.ticket, len(DATA), 5.0)
    finally:
        await server.close()


def test_fresh_bytes_are_bytes_filled_through_the_view() -> None:
    data, view = fresh_bytes(5)
    view[:] = b"hello"
    view.release()
    assert type(data) is bytes
    assert data == b"hello"
    assert hash(data) == hash(b"hello")
    empty, view = fresh_bytes(0)
    assert empty == b""
    assert len(view) == 0


def test_host_of_strips_the_port_and_ipv6_brackets() -> None:
    assert bulk.host_of("10.0.0.1:5") == "10.0.0.1"
    assert bulk.host_of("[::1]:5") == "::1"


class _PushyOfferer(agent_pb2_grpc.WorkerAgentServicer):
    """A source that offers a bulk port nobody listens on, whether the Fetch asked for it or not."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.asked: list[bool] = []

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        self.asked.append(request.bulk)
        header = types_pb2.ValueHeader(key=request.key, size=len(DATA), checksum=checksum(DATA))
        offered = agent_pb2.BulkOffer(port=self.port, ticket=b"t" * bulk.TICKET_BYTES)
        yield agent_pb2.FetchResponse(header=header, bulk=offered)


async def _closed_port() -> int:
    """A loopback port that refuses connections (it was listened on, then closed)."""
    server = await BulkServer.start("127.0.0.1", idle_timeout=5.0)
    await server.close()
    return server.port


async def test_an_unasked_bulk_offer_whose_port_is_unreachable_is_a_corrupt_source() -> None:
    """Asked for chunks after its bulk port proved unreachable, the source offers the port again:
    that breaks the protocol, and the fetch refuses the source rather than raise."""
    pushy = _PushyOfferer(await _closed_port())  # type: ignore[abstract]
    async with fake_peer(pushy) as source:
        peers = _peers()
        try:
            got = await peers.fetch(
                Key("k"), [source], expected_size=len(DATA), expected_checksum="", requester="t"
            )
        finally:
            await peers.close()
    assert not isinstance(got, Fetched)
    assert got.reason.name == "CHECKSUM_MISMATCH", got.message
    assert "not asked for" in got.message
    assert pushy.asked == [True, False]


async def test_a_replicate_from_a_source_pushing_an_unreachable_bulk_port_is_refused() -> None:
    pushy = _PushyOfferer(await _closed_port())  # type: ignore[abstract]
    async with fake_peer(pushy) as source, running_agent() as b, dial(b.address) as stub_b:
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("k", DATA, [source]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "CHECKSUM_MISMATCH"), (
            outcome.message
        )
        assert "k" not in b.store


async def test_a_large_value_crosses_the_bulk_port_intact() -> None:
    """Many sends, receives and hash steps, and a size that is a multiple of none of them."""
    data = os.urandom(64 * 1024 * 1024 + 4097)
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "big", data)
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("big", data, [a.address]))
        assert status(outcome) == "APPLIED", outcome.message
        assert a.node.bulk is not None
        assert a.node.bulk.sent == 1
        value = b.store.get(Key("big"))
        assert value is not None
        assert value.checksum == checksum(data)
        assert value.data == data


@pytest.mark.parametrize(
    "at", [bulk.HASH_BYTES - 1, bulk.HASH_BYTES, bulk.SEND_BYTES, 2 * bulk.SEND_BYTES + 1]
)
async def test_the_digest_covers_every_byte_once_whatever_the_steps(at: int) -> None:
    """The receiver hashes in steps while it receives: a flipped byte anywhere, at a step
    boundary too, changes the digest, which is that of the bytes received."""
    sent = _flip(DATA, at)
    data, digest = await _bulk_round_trip(sent)
    assert data == sent
    assert digest == checksum(sent) != checksum(DATA)


@pytest.mark.parametrize(
    "size",
    [
        0,
        1000,
        bulk.THREAD_BYTES - 1,  # the largest moved on the event loop
        bulk.THREAD_BYTES,  # the smallest moved in a thread, hashed once in
        bulk.PIPELINE_BYTES - 1,
        bulk.PIPELINE_BYTES,  # the smallest hashed by a second thread as it arrives
    ],
)
async def test_every_size_arrives_whole_with_the_digest_of_what_was_sent(size: int) -> None:
    """Small values move on the loop, larger ones in a thread, the largest hashed as they
    arrive: each way the bytes arrive whole, and a flipped last byte changes the digest."""
    sent = os.urandom(size)
    assert await _bulk_round_trip(sent) == (sent, checksum(sent))
    if size:
        flipped = _flip(sent, size - 1)
        data, digest = await _bulk_round_trip(flipped)
        assert data == flipped
        assert digest == checksum(flipped) != checksum(sent)


async def _bulk_round_trip(sent: bytes) -> tuple[bytes, str]:
    """What ``bulk.receive`` makes of ``sent`` offered on a bulk port: its bytes and digest."""
    server = await BulkServer.start("127.0.0.1", idle_timeout=5.0)
    try:
        offer = server.offer(sent)
        sending = asyncio.create_task(offer.sent(claim_timeout=5.0))
        got = await bulk.receive("127.0.0.1", offer.port, offer.ticket, len(sent), 5.0)
        await sending
        return got
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def _stalling_source(payload: bytes) -> AsyncIterator[int]:
    """A port that takes a ticket, sends ``payload`` and then nothing, keeping the connection
    open until the end of the block; its port number."""
    writers: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readexactly(bulk.TICKET_BYTES)
        writer.write(payload)
        await writer.drain()
        await stop.wait()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        stop.set()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


#: Sizes received on the event loop and in a thread.
STALLED_SIZES = pytest.mark.parametrize("size", [2000, len(DATA)], ids=["loop", "thread"])


@STALLED_SIZES
async def test_a_receive_cancelled_mid_transfer_returns_at_once(size: int) -> None:
    """Cancelling the call (its Fetch's deadline) must not wait out the idle timeout."""
    async with _stalling_source(DATA[:1000]) as port:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await bulk.receive("127.0.0.1", port, b"t" * bulk.TICKET_BYTES, size, 60.0)
        assert asyncio.get_running_loop().time() - started < 30.0


@STALLED_SIZES
async def test_a_stalled_receive_ends_with_its_idle_timeout(size: int) -> None:
    async with _stalling_source(DATA[:1000]) as port:
        with pytest.raises(bulk.BulkError, match="1000 of"):
            await bulk.receive("127.0.0.1", port, b"t" * bulk.TICKET_BYTES, size, 0.3)


async def test_closing_the_bulk_port_ends_a_send_the_requester_does_not_read() -> None:
    """A send blocked on a full socket: closing must not wait out the idle timeout, and the
    offer reports the transfer as failed."""
    data = os.urandom(32 * 1024 * 1024)  # more than the socket buffers hold
    server = await BulkServer.start("127.0.0.1", idle_timeout=60.0)
    offer = server.offer(data)
    sending = asyncio.create_task(offer.sent(claim_timeout=5.0))
    reader, writer = await asyncio.open_connection("127.0.0.1", offer.port)
    try:
        writer.write(offer.ticket)
        await writer.drain()
        await reader.readexactly(1024)  # the send has begun; nothing more is read
        started = asyncio.get_running_loop().time()
        await server.close()
        assert asyncio.get_running_loop().time() - started < 30.0
        with pytest.raises(bulk.BulkError):
            await sending
        assert server.sent == 0
    finally:
        writer.close()


#: Values received at once, and the size of each: an agent takes several copies at a time.
POURED = (4, 64 * 1024 * 1024)


class _Ticks:
    """Counts the turns the event loop gives a task that only sleeps, and the longest wait
    between two, over a window: what a poll or HoldsKeys arriving meanwhile would wait."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.times.append(loop.time())
            await asyncio.sleep(0.001)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def within(self, start: float, end: float) -> tuple[int, float]:
        """How many turns fell in ``[start, end]`` and the longest gap without one."""
        inside = [t for t in self.times if start <= t <= end]
        edges = [start, *inside, end]
        return len(inside), max(b - a for a, b in itertools.pairwise(edges))


async def test_receives_leave_the_event_loop_free_while_the_bytes_pour_in() -> None:
    """On loopback the bytes are nearly always there to read, and a receive on the loop did not
    yield then: a few at once held the agent's loop (its polls, HoldsKeys) for most of their
    transfer. The loop must keep turning every few milliseconds while they arrive."""
    count, size = POURED
    values = [os.urandom(size) for _ in range(count)]
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in values]

    def pour(listener: socket.socket, data: bytes) -> None:  # always has the next bytes ready
        connection, _ = listener.accept()
        with connection:
            _read_ticket(connection)
            connection.sendall(data)

    senders = [
        threading.Thread(target=pour, args=(listener, data), daemon=True)
        for listener, data in zip(listeners, values, strict=True)
    ]
    for sender in senders:
        sender.start()
    ticks = _Ticks()
    ticks.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.01)
        start = loop.time()
        got = await asyncio.gather(
            *(
                bulk.receive("127.0.0.1", listener.getsockname()[1], b"t" * 32, size, 30.0)
                for listener in listeners
            )
        )
        end = loop.time()
    finally:
        await ticks.stop()
        for sender in senders:
            sender.join(30)
        for listener in listeners:
            listener.close()
    assert got == [(data, checksum(data)) for data in values]
    took = end - start
    turns, gap = ticks.within(start, end)
    # Held by the receives, the loop waited 0.2 s and more at a time; free, every few ms
    # (0.1 s leaves room for a loaded machine).
    assert turns >= 10, f"the loop turned {turns} times in {took:.2f} s of transfers"
    assert gap < 0.1, f"the loop waited {gap:.2f} s at once during {took:.2f} s of transfers"


def _read_ticket(connection: socket.socket) -> None:
    received = b""
    while len(received) < bulk.TICKET_BYTES:
        part = connection.recv(bulk.TICKET_BYTES - len(received))
        assert part, "closed before the ticket"
        received += part
