"""A cycle follows up on directives an earlier cycle sent and a later one polled too soon to
see done: the AMM's view catches up with them a follow-up after their answers, not an interval
later. AMM and agents are real grpc.aio servers in this process."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from amm import AsyncClient
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import running_agent
from tests.support.waiting import wait_for

DATA = b"follow-up" * 100


async def test_the_view_catches_up_with_drops_answered_after_a_later_cycle_polled(
    tmp_path: Path,
) -> None:
    """Before: the cycle that polled while the drop was held back planned nothing and waited
    the whole interval (20 s here), so the AMM listed both copies for 20 s after the drop."""
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(
            AmmServer(amm_config(tmp_path, interval="20s", start=False))
        )
        manager = amm.manager
        assert manager is not None
        client = await stack.enter_async_context(AsyncClient(amm.address, timeout=10))
        agents = [await stack.enter_async_context(running_agent(amm=amm.address)) for _ in range(2)]
        await wait_for(client.workers, lambda ws: len(ws) == 2, what="agents registered")
        await client.put_many({"k": DATA}, workers=[a.address for a in agents])
        # Each agent carries out one batch of drops at a time: held here, the drop the first
        # cycle sends stays unanswered.
        held = [a.node.runner._dropping for a in agents]
        for lock in held:
            await lock.acquire()
        try:
            await client.amm.start()
            await wait_for(
                client.status,
                lambda s: s.totals.directives_in_flight == 1,
                within=20,
                what="the drop in flight",
            )
            manager.wake()  # a second cycle polls now: it sees both copies and plans nothing
            await wait_for(
                lambda: manager.cycles >= 2 and not manager._cycle_lock.locked(),
                within=20,
                what="a second cycle",
            )
            assert len((await client.who_has(["k"], fresh=False))["k"]) == 2
        finally:
            for lock in held:
                lock.release()
        await wait_for(
            lambda: client.who_has(["k"], fresh=False),
            lambda holders: len(holders["k"]) == 1,
            within=10,
            what="the AMM's view of the drop",
        )
