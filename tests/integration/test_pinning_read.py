"""A Get that pins (``GetRequest.pin``): the read and the pin are one step on the agent.

A replay step pins its inputs on its worker; read through the worker and then pinned in a second
call, a fresh replica could be dropped in between (and one the worker had no room to keep never
could be pinned), so ``make demo`` once failed with "the replica was gone 5 times".
"""

from __future__ import annotations

import grpc
import pytest

from amm.v1 import agent_pb2
from tests.support.agent import dial, put, running_agent

VALUE = b"p" * 200_000


async def _read(stub: object, key: str, source: str, *, pin: bool) -> agent_pb2.GetResponse:
    """The first message (the header) of a Get from ``source``."""
    call = stub.Get(agent_pb2.GetRequest(key=key, sources=[source], pin=pin))  # type: ignore[attr-defined]
    try:
        async for message in call:
            return message  # type: ignore[no-any-return]
    finally:
        call.cancel()
    raise AssertionError("no header")


async def test_a_read_that_pins_holds_the_fetched_replica_pinned_when_it_answers() -> None:
    async with (
        running_agent() as source,
        running_agent() as reader,
        dial(source.address) as source_stub,
        dial(reader.address) as stub,
    ):
        await put(source_stub, "in", VALUE)
        first = await _read(stub, "in", source.address, pin=True)
        assert (first.header.replicated, first.header.pins) == (True, 1)
        again = await _read(stub, "in", source.address, pin=True)
        assert (again.header.replicated, again.header.pins) == (False, 2)
        plain = await _read(stub, "in", source.address, pin=False)
        assert plain.header.pins == 0
        polled = await stub.Poll(agent_pb2.PollRequest())
        assert [(k.key, k.pinned) for k in polled.keys] == [("in", True)]
        # The pins outlive the calls: two unpins, and no more.
        assert (await stub.Unpin(agent_pb2.UnpinRequest(key="in"))).pins == 1
        assert (await stub.Unpin(agent_pb2.UnpinRequest(key="in"))).pins == 0


async def test_a_read_that_pins_is_refused_where_the_replica_cannot_be_kept() -> None:
    async with (
        running_agent() as source,
        running_agent(memory_limit=len(VALUE) // 2, pause_fraction=None) as reader,
        dial(source.address) as source_stub,
        dial(reader.address) as stub,
    ):
        await put(source_stub, "in", VALUE)
        # Served once (no room to keep it) without a pin, as before ...
        plain = await _read(stub, "in", source.address, pin=False)
        assert (plain.header.size, plain.header.replicated) == (len(VALUE), False)
        # ... but a pin on what is not kept would be a lie: refused, nothing left pinned.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _read(stub, "in", source.address, pin=True)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no room to keep 'in'" in (refused.value.details() or "")
        polled = await stub.Poll(agent_pb2.PollRequest())
        assert list(polled.keys) == []
