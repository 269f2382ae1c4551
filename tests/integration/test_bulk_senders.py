"""A bulk port sends at most ``max_senders`` large values at once, each in a thread; the others
wait their turn in order, within the idle timeout, and one cancelled while it waits leaves the
queue. Real bulk ports and sockets on loopback; the receivers claim their tickets and hold off
reading, so that the sends are all under way at once."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import pytest

from amm.base.checksum import checksum
from tests.support.agent import (
    agents,
    dial,
    directive_stream,
    put,
    replicate,
    running_agent,
    status,
)
from tests.support.waiting import wait_for
from worker_agent import bulk
from worker_agent.bulk import BulkServer, Offer
from worker_agent.config import AgentConfig
from worker_agent.store import Key

#: More than the socket buffers of a loopback connection hold: a send that nobody reads blocks.
SIZE = 16 * 1024 * 1024
BLOB = os.urandom(SIZE)


def _value(n: int) -> bytes:
    return n.to_bytes(4, "big") + BLOB[4:]


class _Claim:
    """A requester that claimed its ticket and reads when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def of(cls, offer: Offer) -> _Claim:
        reader, writer = await asyncio.open_connection("127.0.0.1", offer.port)
        writer.write(offer.ticket)
        await writer.drain()
        return cls(reader, writer)

    async def read(self) -> bytes:
        try:
            return await self.reader.readexactly(SIZE)
        finally:
            self.writer.close()


def _in_line(server: BulkServer, count: int) -> Callable[[], bool]:
    """Whether ``count`` transfers send or wait."""
    return lambda: server.sending + server.waiting == count


def _send_threads() -> int:
    return sum(t.name == "bulk send" for t in threading.enumerate())


async def test_more_large_fetches_than_senders_all_arrive_whole_a_few_at_a_time() -> None:
    """Six at once with two senders: two send, four wait; every value arrives whole, and never
    more than two threads sent at once."""
    server = await BulkServer.start("127.0.0.1", idle_timeout=30.0, max_senders=2)
    try:
        values = [_value(n) for n in range(6)]
        offers = [server.offer(v) for v in values]
        sent = [asyncio.create_task(o.sent(claim_timeout=10.0)) for o in offers]
        claims = [await _Claim.of(o) for o in offers]
        await wait_for(lambda: (server.sending, server.waiting) == (2, 4), what="2 send, 4 wait")
        assert _send_threads() == 2
        got = await asyncio.gather(*(c.read() for c in claims))
        await asyncio.gather(*sent)
        assert [checksum(g) for g in got] == [checksum(v) for v in values]
        assert got == values
        assert (server.sent, server.most_sending, server.sending, server.waiting) == (6, 2, 0, 0)
    finally:
        await server.close()


async def test_waiting_transfers_are_served_in_the_order_they_claimed() -> None:
    server = await BulkServer.start("127.0.0.1", idle_timeout=30.0, max_senders=1)
    try:
        offers = [server.offer(_value(n)) for n in range(4)]
        finished: list[int] = []

        async def sent(n: int) -> None:
            await offers[n].sent(claim_timeout=10.0)
            finished.append(n)

        tasks = [asyncio.create_task(sent(n)) for n in range(4)]
        claims = []
        for n, offer in enumerate(offers):
            claims.append(await _Claim.of(offer))
            await wait_for(_in_line(server, n + 1), what="queued")
        reads = [asyncio.create_task(c.read()) for c in reversed(claims)]
        await asyncio.gather(*tasks, *reads)
        assert finished == [0, 1, 2, 3]
        assert server.most_sending == 1
    finally:
        await server.close()


async def test_a_transfer_cancelled_while_it_waits_leaves_the_queue() -> None:
    """One sender, busy; two wait. The first waiting is cancelled: the sender, once free, goes
    to the next, which arrives whole; closing the port with one more waiting leaves nothing
    behind."""
    server = await BulkServer.start("127.0.0.1", idle_timeout=30.0, max_senders=1)
    try:
        offers = [server.offer(_value(n)) for n in range(4)]
        sent = [asyncio.create_task(o.sent(claim_timeout=10.0)) for o in offers]
        tasks: list[set[asyncio.Task[None]]] = []
        claims = []
        for n, offer in enumerate(offers[:3]):
            claims.append(await _Claim.of(offer))
            await wait_for(_in_line(server, n + 1), what="queued")
            tasks.append(set(server._connections) - set().union(*tasks))
        [second] = tasks[1]
        second.cancel()
        await wait_for(lambda: server.waiting == 1, what="the cancelled one gone")
        with pytest.raises(bulk.BulkError):
            await sent[1]
        claims[1].writer.close()
        first, third = await asyncio.gather(claims[0].read(), claims[2].read())
        assert (first, third) == (_value(0), _value(2))
        await asyncio.gather(sent[0], sent[2])
        assert (server.sent, server.sending, server.waiting) == (2, 0, 0)
        # A fourth waits behind a busy sender, and the port closes.
        blocker = server.offer(_value(9))
        blocked = asyncio.create_task(blocker.sent(claim_timeout=10.0))
        holding = await _Claim.of(blocker)
        await wait_for(lambda: server.sending == 1, what="the sender busy")
        fourth = await _Claim.of(offers[3])
        await wait_for(lambda: server.waiting == 1, what="the fourth waiting")
    finally:
        await server.close()
    for waiting in (sent[3], blocked):
        with pytest.raises(bulk.BulkError):
            await waiting
    assert (server.sending, server.waiting) == (0, 0)
    await wait_for(lambda: _send_threads() == 0, what="no sending thread left")
    holding.writer.close()
    fourth.writer.close()


async def test_a_transfer_waiting_longer_than_the_idle_timeout_fails_and_takes_nothing() -> None:
    """Its receiver would have given up too; the sender it never had is not lost."""
    server = await BulkServer.start("127.0.0.1", idle_timeout=0.5, max_senders=1)
    try:
        busy, late = server.offer(_value(1)), server.offer(_value(2))
        sending = asyncio.create_task(busy.sent(claim_timeout=10.0))
        waiting = asyncio.create_task(late.sent(claim_timeout=10.0))
        first = await _Claim.of(busy)
        await wait_for(lambda: server.sending == 1, what="the sender busy")
        second = await _Claim.of(late)
        with pytest.raises(bulk.BulkError, match="ended early"):
            await waiting
        with pytest.raises(bulk.BulkError):  # nobody read it either
            await sending
        first.writer.close()
        second.writer.close()
        after = server.offer(_value(3))
        done = asyncio.create_task(after.sent(claim_timeout=10.0))
        assert await (await _Claim.of(after)).read() == _value(3)
        await done
        assert (server.sending, server.waiting) == (0, 0)
    finally:
        await server.close()


def test_the_cap_is_an_agent_setting() -> None:
    assert AgentConfig().max_bulk_senders == bulk.MAX_SENDERS
    assert AgentConfig(max_bulk_senders=2).max_bulk_senders == 2
    with pytest.raises(ValueError, match="max_bulk_senders must be >= 1"):
        AgentConfig(max_bulk_senders=0)


async def test_an_agent_serving_more_copies_than_its_senders_sends_each_whole() -> None:
    """Two agents each take three copies at once from a source with two senders: all six
    arrive whole and verified, and the source never sent more than two at once."""
    values = {f"v{n}": _value(n) for n in range(6)}
    async with (
        running_agent(max_bulk_senders=2) as source,
        agents(2) as [(one, stub_one), (two, stub_two)],
        dial(source.address) as stub,
    ):
        for key, data in values.items():
            await put(stub, key, data)
        async with directive_stream(stub_one) as first, directive_stream(stub_two) as second:
            streams = {key: first if n % 2 else second for n, key in enumerate(values)}
            for key, data in values.items():
                await streams[key].send(replicate(key, data, [source.address]))
            outcomes = [await s.outcome() for s in (first, second) for _ in range(3)]
        assert [status(o) for o in outcomes] == ["APPLIED"] * 6, [o.message for o in outcomes]
        for n, (key, data) in enumerate(values.items()):
            copy = (one if n % 2 else two).store.get(Key(key))
            assert copy is not None
            assert copy.checksum == checksum(data)
            assert copy.data == data
        assert source.node.bulk is not None
        assert source.node.bulk.sent == 6
        assert 1 <= source.node.bulk.most_sending <= 2
