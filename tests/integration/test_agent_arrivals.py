"""A call arriving at an agent hurries its bulk work until the call's handler runs, over a real
gRPC server: bulk work then breathes after about every slice, not once per budget."""

from __future__ import annotations

import asyncio

from amm.v1 import agent_pb2
from tests.support.agent import agents
from worker_agent import pacing


async def test_a_call_arriving_makes_bulk_work_breathe_until_its_handler_runs() -> None:
    """A bulk loop whose budget is never spent by the clock breathes (pauses) only while a
    call is on its way to its handler: handed to the loop by gRPC, not yet run. Once the call
    is answered, nothing hurries bulk work any longer."""
    async with agents(1) as [(_, stub)]:
        pace = pacing.Pace(budget=1e9)  # never spent by the clock
        call = asyncio.ensure_future(stub.HoldsKeys(agent_pb2.HoldsKeysRequest(keys=["k"])))
        paused, turns = 0, 0
        while not call.done():
            await asyncio.sleep(0)  # a slice of bulk work ends, the loop turns
            paused += await pace.breathe()
            turns += 1
        await call
        assert paused >= 1, f"bulk work never breathed in {turns} turns while the call arrived"
        assert not pacing.hurried(), "the handler said it runs"
        for _ in range(10):
            await asyncio.sleep(0)
            assert not await pace.breathe(), "nothing arriving: bulk work goes on"
