"""A fresh WhoHas of a few keys asks the agents which of the keys they hold (HoldsKeys) instead of
polling every inventory: it answers as of call time while a cycle's poll of the same agents is
still under way, merges what it learnt of those keys into the state, and falls back to the state
for an agent that does not answer.

Agents are fakes over real gRPC whose polls can be held at will; the AMM is a real in-process one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from amm_service.errors import NotFound, Unavailable
from amm_service.runtime.links.addresses import address_order
from amm_service.runtime.loop.pacing import BUDGET, hurried
from amm_service.runtime.observe.queries import Queries
from tests.conftest import amm_config
from tests.support.faults import amm_with_fake_peers
from tests.support.pacing import PacedBulk
from tests.support.waiting import wait_for

DIGEST = "b" * 64


class _Agent(agent_pb2_grpc.WorkerAgentServicer):
    """Holds ``held``; its polls wait while ``hold_polls`` is clear once ``holding`` is set."""

    def __init__(self, name: str, held: set[str]) -> None:
        self.name = name
        self.held = held
        self.holding = False
        self.hold_polls = asyncio.Event()
        self.polls_held = 0
        self.answers_lookups = True
        self.answers_polls = True
        #: Once cleared, lookups wait until it is set again.
        self.lookups_go = asyncio.Event()
        self.lookups_go.set()
        self.lookups_waiting = 0

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        if not self.answers_polls:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        if self.holding:
            self.polls_held += 1
            await self.hold_polls.wait()
        return agent_pb2.PollResponse(
            incarnation=self.name,
            version=1,
            full=True,
            keys=[types_pb2.KeyInfo(key=k, size=1, checksum=DIGEST) for k in sorted(self.held)],
            status=types_pb2.WORKER_STATUS_RUNNING,
            features=["key-lookups"],
        )

    async def HoldsKeys(self, request: Any, context: Any) -> agent_pb2.HoldsKeysResponse:
        if not self.answers_lookups:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        self.lookups_waiting += 1
        await self.lookups_go.wait()
        self.lookups_waiting -= 1
        return agent_pb2.HoldsKeysResponse(
            incarnation=self.name,
            version=1,
            keys=[
                types_pb2.KeyInfo(key=k, size=1, checksum=DIGEST)
                for k in request.keys
                if k in self.held
            ],
        )


class _Two(NamedTuple):
    queries: Queries
    one: _Agent
    two: _Agent
    address_one: str
    address_two: str


@contextlib.asynccontextmanager
async def _two_agents(
    tmp_path: Path, held_one: set[str], held_two: set[str]
) -> AsyncIterator[_Two]:
    """An AMM with two fake agents registered and polled once (inventories and features in)."""
    one = _Agent("one", held_one)  # type: ignore[abstract]
    two = _Agent("two", held_two)  # type: ignore[abstract]
    peers = {"one": one, "two": two}
    async with amm_with_fake_peers(amm_config(tmp_path), peers) as (_, manager, addresses):
        await manager.queries.refresh(True)
        yield _Two(manager.queries, one, two, *addresses)


async def test_a_fresh_who_has_of_a_few_keys_does_not_wait_behind_polls(tmp_path: Path) -> None:
    async with _two_agents(tmp_path, {"x"}, {"x", "y"}) as cluster:
        queries, one, two, address_one, address_two = cluster
        both = tuple(sorted([address_one, address_two], key=address_order))
        one.holding = two.holding = True
        polling = asyncio.create_task(queries.refresh(True))  # as a cycle's polls, held
        try:
            await wait_for(lambda: one.polls_held + two.polls_held == 2, what="polls held")
            one.held.add("z")  # put a moment ago: no poll has seen it
            two.held.discard("y")  # gone a moment ago
            answer = await asyncio.wait_for(queries.who_has(["x", "z"], fresh=True), 10)
            assert dict(answer) == {
                "x": both,
                "z": (address_one,),
            }
            # Merged into the state for those keys: what is read next agrees.
            assert await queries.who_has(["z"], fresh=False) == [("z", (address_one,))]
            with pytest.raises(NotFound, match="unknown key"):
                await asyncio.wait_for(queries.who_has(["y"], fresh=True), 10)
            with pytest.raises(NotFound, match="unknown key"):
                await queries.who_has(["y"], fresh=False)
            # An agent that does not answer counts as the state knows it, as a missed poll would.
            two.answers_lookups = False
            answer = await asyncio.wait_for(queries.who_has(["x"], fresh=True), 10)
            assert dict(answer) == {"x": both}
            assert not polling.done(), "the polls were held all along"
        finally:
            one.hold_polls.set()
            two.hold_polls.set()
            await polling


async def test_a_key_only_a_silent_agent_may_hold_is_unavailable_not_not_found(
    tmp_path: Path,
) -> None:
    """An agent that does not answer a fresh query (slow, just restarted on its address, or dead
    but not declared so yet) may hold a key nobody else does: NOT_FOUND would be a wrong answer
    about a key that exists (chaos episode 2:41: a key put on an agent just restarted), so the
    query says it cannot tell, and asking again once the agent answers finds the key."""
    async with _two_agents(tmp_path, {"x"}, {"x"}) as cluster:
        queries, _, two, address_one, address_two = cluster
        two.held.add("z")  # put a moment ago: no poll has seen it
        two.answers_lookups = two.answers_polls = False
        silent = f"cannot tell whether any worker holds 'z': '{address_two}' did not answer"
        with pytest.raises(Unavailable, match=silent):
            await asyncio.wait_for(queries.who_has(["z"], fresh=True), 10)
        with pytest.raises(Unavailable, match="cannot tell"):  # asked through polls
            await asyncio.wait_for(queries.replicate(["z"], 2), 10)
        with pytest.raises(Unavailable, match="cannot tell"):
            await asyncio.wait_for(queries.forget(["z"]), 10)
        # Keys another agent holds are answered as before; unknown ones, once all answer.
        assert dict(await queries.who_has(["x"], fresh=True)) == {
            "x": tuple(sorted([address_one, address_two], key=address_order))
        }
        two.answers_lookups = two.answers_polls = True
        assert await queries.who_has(["z"], fresh=True) == [("z", (address_two,))]
        with pytest.raises(NotFound, match="unknown key"):
            await asyncio.wait_for(queries.who_has(["nowhere"], fresh=True), 10)


async def test_bulk_work_makes_way_for_a_fresh_who_has_waiting_for_the_agents(
    tmp_path: Path,
) -> None:
    """While a fresh who_has waits for the agents' answers, the bulk work under way in the AMM's
    loop (a big cycle's planning, sending, outcomes) breathes after every slice, not once per
    ``pacing.BUDGET`` of work: each answer is taken in at once, not after up to a budget of
    bulk work each (4 agents: 4 waits, the fresh who_has p99 during a 100k-key convergence)."""
    async with _two_agents(tmp_path, {"x"}, {"x"}) as cluster:
        queries, one, _, address_one, address_two = cluster
        bulk = PacedBulk()
        work = asyncio.create_task(bulk.run())
        try:
            usual = round(BUDGET / PacedBulk.SLICE)
            # The fake agents' servers share the AMM's loop: their calls arrive as the AMM's do.
            await wait_for(lambda: not hurried(), what="no call arriving")
            assert await bulk.per_breath() >= usual - 1, "a budget of work between breaths"
            one.lookups_go.clear()  # its answer is slow
            asking = asyncio.create_task(queries.who_has(["x"], fresh=True))
            await wait_for(lambda: one.lookups_waiting == 1, what="the lookup under way")
            assert await bulk.per_breath() <= 1.5, "a breath after (about) every slice"
            one.lookups_go.set()
            both = tuple(sorted([address_one, address_two], key=address_order))
            assert await asyncio.wait_for(asking, 10) == [("x", both)]
            await wait_for(lambda: not hurried(), what="no call arriving")
            assert await bulk.per_breath() >= usual - 1, "as before once it is answered"
        finally:
            one.lookups_go.set()
            bulk.stop = True
            await work
