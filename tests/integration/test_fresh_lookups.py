"""A fresh WhoHas of a few keys asks the agents which of the keys they hold (HoldsKeys) instead of
polling every inventory: it answers as of call time while a cycle's poll of the same agents is
still under way, merges what it learnt of those keys into the state, and falls back to the state
for an agent that does not answer.

Agents are fakes over real gRPC whose polls can be held at will; the AMM is a real in-process one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.errors import NotFound
from amm_service.runtime.addresses import address_order
from tests.conftest import amm_config
from tests.support.faults import fake_peer
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

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
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
        return agent_pb2.HoldsKeysResponse(
            incarnation=self.name,
            version=1,
            keys=[
                types_pb2.KeyInfo(key=k, size=1, checksum=DIGEST)
                for k in request.keys
                if k in self.held
            ],
        )


async def test_a_fresh_who_has_of_a_few_keys_does_not_wait_behind_polls(tmp_path: Path) -> None:
    one = _Agent("one", {"x"})  # type: ignore[abstract]
    two = _Agent("two", {"x", "y"})  # type: ignore[abstract]
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        fake_peer(one) as address_one,
        fake_peer(two) as address_two,
    ):
        manager = amm.manager
        assert manager is not None
        await manager.register(address_one, "one", "one")
        await manager.register(address_two, "two", "two")
        await manager.queries.refresh(True)  # both inventories and features are in
        queries = manager.queries
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
