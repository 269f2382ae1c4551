"""A stopped AMM keeps its view current: it polls every agent once an interval (changes only, no
planning, no directives), so queries answer without a fresh poll and the first cycle after a
start has only a change poll to do, not every inventory to read whole, with
``poll-while-stopped`` on (off by default: no polls while stopped, without the dashboard).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from amm.client import AsyncClient
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.view import WorkerId
from tests.conftest import amm_config
from tests.support.faults import fake_peer
from tests.support.processes import local_cluster
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig

LOOPBACK = "127.0.0.1:0"


async def test_keys_put_while_stopped_show_in_the_view_without_a_start_or_a_fresh_query() -> None:
    """Real AMM and agent processes: the keys put on one worker while the AMM is stopped are
    listed by ListWorkers and HasWhat (not fresh) within a few intervals, and the AMM still has
    run no cycle and sent nothing."""
    keys = {f"k{n:04d}": b"v" * 100 for n in range(600)}
    with local_cluster(2, interval=0.2, service_args=["--poll-while-stopped"]) as cluster:
        async with AsyncClient(cluster.address, timeout=20) as client:
            assert (await client.status()).running is False
            w1, w2 = list(await client.has_what())
            await client.put_many(keys, workers=[w1])

            async def counts() -> dict[str, int]:
                return {w.address: w.key_count for w in await client.workers(fresh=False)}

            await wait_for(
                counts,
                lambda got: got == {w1: len(keys), w2: 0},
                within=5,
                what="ListWorkers (not fresh) counting the keys put while stopped",
            )
            held = await client.has_what(fresh=False)
            assert held == {w1: tuple(sorted(keys)), w2: ()}
            assert set(await client.who_has(["k0000", "k0599"], fresh=False)) == {
                "k0000",
                "k0599",
            }
            status = await client.status()
            assert (status.running, status.cycles, status.totals.directives_sent) == (False, 0, 0)


def _count_polls(agent: Agent, answers: list[bool]) -> None:
    """Note whether each poll the agent answers is a full snapshot (``True``) or changes."""
    poll: Callable[..., Any] = agent.node.poll

    def counted(**kwargs: Any) -> Any:
        inventory = poll(**kwargs)
        answers.append(inventory.full)
        return inventory

    agent.node.poll = counted  # type: ignore[method-assign]


async def test_the_first_cycle_after_a_start_plans_on_a_view_read_while_stopped(
    tmp_path: Path,
) -> None:
    """Keys held twice are put while the AMM is stopped; once the view shows them (no query
    asked for it), a start's first cycle plans the drops off that view: no agent answers it, or
    any later poll, with a full snapshot."""
    config = amm_config(tmp_path, start=False, interval="100ms", poll_while_stopped=True)
    keys = {f"k{n:03d}": b"x" * 1000 for n in range(300)}
    async with (
        AmmServer(config) as amm,
        Agent(AgentConfig(amm=amm.address, listen=LOOPBACK, name="w1")) as w1,
        Agent(AgentConfig(amm=amm.address, listen=LOOPBACK, name="w2")) as w2,
        AsyncClient(amm.address, timeout=20) as client,
    ):
        answers: list[bool] = []
        for agent in (w1, w2):
            _count_polls(agent, answers)
        both = [w1.node.address, w2.node.address]
        await client.put_many(keys, workers=both)

        async def counts() -> list[int]:
            return [w.key_count for w in await client.workers(fresh=False)]

        await wait_for(
            counts,
            lambda got: got == [len(keys)] * 2,
            within=5,
            what="the view showing both agents' keys while stopped",
        )
        assert (await client.status()).cycles == 0
        started_at = len(answers)
        await client.amm.start()
        await wait_for(
            client.status, lambda s: s.cycles >= 1, what="the first cycle after the start"
        )
        await wait_for(
            lambda: sum(len(a.store) for a in (w1, w2)),
            lambda held: held == len(keys),
            what="one copy of each key left",
        )
        assert answers[started_at:], "no poll after the start"
        assert not any(answers[started_at:]), "a full snapshot was read after the start"


async def test_with_polling_while_stopped_off_a_stopped_amm_does_not_poll(tmp_path: Path) -> None:
    """The old way, for whoever wants it: a stopped AMM without the dashboard polls nobody
    (after taking the agents' first inventories at registration), so the view keeps what it
    read then until a cycle or a fresh query."""
    config = amm_config(tmp_path, start=False, interval="50ms", poll_while_stopped=False)
    async with (
        AmmServer(config) as amm,
        Agent(AgentConfig(amm=amm.address, listen=LOOPBACK, name="w1")) as w1,
        AsyncClient(amm.address, timeout=20) as client,
    ):
        answers: list[bool] = []
        await wait_for(
            client.workers,
            lambda got: len(got) == 1 and got[0].last_poll is not None,
            what="w1 registered and polled once, as every new worker is",
        )
        _count_polls(w1, answers)
        await client.put("k", b"v", w1.node.address)
        await asyncio.sleep(0.5)  # ten intervals: a poll while stopped would have come by now
        assert answers == []
        assert [w.key_count for w in await client.workers(fresh=False)] == [0]
        assert [w.key_count for w in await client.workers(fresh=True)] == [1]
        assert len(answers) == 1  # the fresh query's


class _Flaky(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls (holding nothing) while ``answering``; refuses them otherwise, as an agent
    cut off by a partition does."""

    def __init__(self) -> None:
        self.answering = True

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        if not self.answering:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cut off")
        return agent_pb2.PollResponse(
            incarnation="flaky", version=1, full=True, status=types_pb2.WORKER_STATUS_RUNNING
        )


async def test_a_worker_that_answered_while_stopped_is_timed_afresh_when_it_falls_silent(
    tmp_path: Path,
) -> None:
    """A worker a cycle saw silent, that answers the polls made while the AMM is stopped, then
    falls silent again: its silence counts from the next cycle that misses it, not from the
    first, so it is not declared dead at once (the AMM heard from it in between)."""
    config = amm_config(
        tmp_path,
        start=False,
        interval="100ms",
        stale_after="5s",
        dead_after="1s",
        poll_while_stopped=True,
    )
    flaky = _Flaky()  # type: ignore[abstract]
    async with AmmServer(config) as amm, fake_peer(flaky) as address:
        manager = amm.manager
        assert manager is not None
        await manager.register(address, "flaky", "flaky")
        flaky.answering = False
        silent_from = time.monotonic()
        assert (await manager.run_cycle()).unreachable == (address,)  # its silence starts

        def missed() -> int:
            known = manager.state.worker(WorkerId(address))
            assert known is not None
            return known.missed_polls

        flaky.answering = True
        await wait_for(missed, lambda n: n == 0, what="an answer to a poll made while stopped")
        flaky.answering = False
        await wait_for(missed, lambda n: n > 0, what="a poll made while stopped missed")
        await wait_for(
            time.monotonic, lambda now: now > silent_from + 1.5, what="dead-after passed"
        )
        await manager.run_cycle()
        assert manager.state.worker(WorkerId(address)) is not None, "declared dead at once"
        assert manager.events.counts["worker-dead"] == 0
