"""Helpers for the worker agent's tests: in-process agents and the calls a client or AMM makes.

Agents run standalone (``amm=None``) on 127.0.0.1:0; tests talk to them only through the generated
stubs, and play the AMM themselves by opening the Directives stream (``DirectiveStream``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeAlias, TypeVar

import grpc

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig

T = TypeVar("T")
# A string: the async stub class exists for type checkers only.
Stub: TypeAlias = "agent_pb2_grpc.WorkerAgentAsyncStub"

_ids = itertools.count(1)


def new_id(prefix: str = "d") -> str:
    return f"{prefix}-{next(_ids)}"


@asynccontextmanager
async def running_agent(**overrides: Any) -> AsyncIterator[Agent]:
    """A started standalone agent, stopped on exit."""
    config = AgentConfig(**{"amm": None, "listen": "127.0.0.1:0", **overrides})
    async with Agent(config) as agent:
        yield agent


@asynccontextmanager
async def dial(address: str) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        yield agent_pb2_grpc.WorkerAgentStub(channel)


@asynccontextmanager
async def agents(n: int, **overrides: Any) -> AsyncIterator[list[tuple[Agent, Stub]]]:
    """``n`` started agents, each with a stub dialled to it."""
    async with AsyncExitStack() as stack:
        pairs = []
        for _ in range(n):
            agent = await stack.enter_async_context(running_agent(**overrides))
            pairs.append((agent, await stack.enter_async_context(dial(agent.address))))
        yield pairs


async def put(
    stub: Stub, key: str, data: bytes, *, chunk_size: int = 64 * 1024, with_checksum: bool = True
) -> agent_pb2.PutResponse:
    header = agent_pb2.PutHeader(
        key=key, size=len(data), checksum=checksum(data) if with_checksum else ""
    )
    messages = [agent_pb2.PutRequest(header=header)]
    messages += [
        agent_pb2.PutRequest(chunk=data[i : i + chunk_size])
        for i in range(0, len(data), chunk_size)
    ]
    return await stub.Put(iter(messages))


async def put_everywhere(stubs: Sequence[Stub], keys: Iterable[str], data: bytes) -> None:
    """``data`` put under each of ``keys`` on every agent of ``stubs``: a key held by several."""
    for key in keys:
        for stub in stubs:
            await put(stub, key, data)


async def put_raw(stub: Stub, messages: list[agent_pb2.PutRequest]) -> agent_pb2.PutResponse:
    return await stub.Put(iter(messages))


async def get(stub: Stub, key: str, sources: list[str] | None = None) -> tuple[Any, bytes]:
    """The header and the reassembled value of a Get."""
    messages = [m async for m in stub.Get(agent_pb2.GetRequest(key=key, sources=sources or []))]
    return _reassemble(messages)


async def fetch(stub: Stub, key: str, expected_checksum: str = "") -> tuple[Any, bytes]:
    request = agent_pb2.FetchRequest(key=key, checksum=expected_checksum, requester="test")
    return _reassemble([m async for m in stub.Fetch(request)])


def _reassemble(messages: list[Any]) -> tuple[Any, bytes]:
    assert messages, "empty stream"
    assert messages[0].WhichOneof("item") == "header"
    assert all(m.WhichOneof("item") == "chunk" for m in messages[1:])
    return messages[0].header, b"".join(m.chunk for m in messages[1:])


async def poll(stub: Stub, **kwargs: Any) -> agent_pb2.PollResponse:
    return await stub.Poll(agent_pb2.PollRequest(**kwargs))


def drop(key: str, holders: list[str], **kwargs: Any) -> types_pb2.Directive:
    kwargs.setdefault("id", new_id("drop"))
    return types_pb2.Directive(op=types_pb2.DIRECTIVE_OP_DROP, key=key, holders=holders, **kwargs)


def replicate(key: str, data: bytes, sources: list[str], **kwargs: Any) -> types_pb2.Directive:
    kwargs.setdefault("id", new_id("replicate"))
    kwargs.setdefault("size", len(data))
    kwargs.setdefault("checksum", checksum(data))
    return types_pb2.Directive(
        op=types_pb2.DIRECTIVE_OP_REPLICATE, key=key, sources=sources, **kwargs
    )


class DirectiveStream:
    """The AMM's side of one Directives stream: directives in through a queue, outcomes out."""

    def __init__(self, stub: Stub) -> None:
        self._requests: asyncio.Queue[agent_pb2.DirectivesRequest | None] = asyncio.Queue()
        self.call = stub.Directives(self._iterate())
        self._responses = aiter(self.call)

    async def _iterate(self) -> AsyncIterator[agent_pb2.DirectivesRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def send(self, directive: types_pb2.Directive) -> None:
        self._requests.put_nowait(agent_pb2.DirectivesRequest(directive=directive))

    async def send_batch(self, directives: list[types_pb2.Directive]) -> None:
        self._requests.put_nowait(agent_pb2.DirectivesRequest(batch=directives))

    def send_message(self, request: agent_pb2.DirectivesRequest) -> None:
        """Send a message built beforehand (building 5,000 directives is itself slow)."""
        self._requests.put_nowait(request)

    def done_writing(self) -> None:
        self._requests.put_nowait(None)

    async def next_response(self, within: float = 10.0) -> agent_pb2.DirectivesResponse | None:
        """The next message, or None when the agent ended the stream."""
        try:
            return await asyncio.wait_for(anext(self._responses), within)
        except StopAsyncIteration:
            return None

    async def outcome(self, within: float = 10.0) -> types_pb2.DirectiveOutcome:
        response = await self.next_response(within)
        assert response is not None, "the stream ended"
        return response.outcome

    async def run(self, directive: types_pb2.Directive) -> types_pb2.DirectiveOutcome:
        """Send one directive and read the next outcome (only when nothing else is in flight)."""
        await self.send(directive)
        outcome = await self.outcome()
        assert outcome.directive_id == directive.id
        return outcome

    async def close(self) -> None:
        self.call.cancel()


@asynccontextmanager
async def directive_stream(stub: Stub) -> AsyncIterator[DirectiveStream]:
    stream = DirectiveStream(stub)
    try:
        yield stream
    finally:
        await stream.close()


async def run_batch(
    stub: Stub, directives: list[types_pb2.Directive], *, incarnation: str | None = None
) -> list[types_pb2.DirectiveOutcome]:
    """Send ``directives`` as one batch message; the outcomes, each once, in arrival order.
    With ``incarnation``, every answer must say it came from that agent process."""
    outcomes: list[types_pb2.DirectiveOutcome] = []
    async with directive_stream(stub) as amm:
        await amm.send_batch(directives)
        while len(outcomes) < len(directives):
            response = await amm.next_response(within=20)
            assert response is not None, "the stream ended before every outcome"
            assert not response.HasField("outcome"), "a batch is answered with batches"
            if incarnation is not None:
                assert response.incarnation == incarnation
            outcomes.extend(response.batch)
    assert sorted(o.directive_id for o in outcomes) == sorted(d.id for d in directives)
    return outcomes


def status(outcome: types_pb2.DirectiveOutcome) -> str:
    return types_pb2.OutcomeStatus.Name(outcome.status).removeprefix("OUTCOME_STATUS_")


def reason(value: Any) -> str:
    """The name of a RefusalReason (of an outcome or a PromiseKeep answer) without prefix."""
    return types_pb2.RefusalReason.Name(value.reason).removeprefix("REFUSAL_REASON_")


def inventory_answer(
    request: agent_pb2.PollRequest,
    name: str,
    inventory: Sequence[types_pb2.KeyInfo],
    features: Sequence[str],
) -> agent_pb2.PollResponse:
    """A fake agent's Poll answer that never changes: its whole ``inventory`` at version 1 when
    the AMM asks for a snapshot (or knew another process as ``name``), nothing new after."""
    full = request.since_version == 0 or request.incarnation != name
    return agent_pb2.PollResponse(
        incarnation=name,
        version=1,
        full=full,
        keys=inventory if full else [],
        status=types_pb2.WORKER_STATUS_RUNNING,
        features=features,
    )
