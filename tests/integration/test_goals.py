"""Tracked replication goals against real agents: copies recreated after a worker dies, a goal of
every worker reaching a newcomer, no fight with ReduceReplicas, goals across an AMM restart, and
clear statuses for bad input. The AMM and agents are real grpc.aio servers in this process.

The agents run standalone and are registered with the AMM by the test, so stopping one is a
crash as the AMM sees it: no unregistration, the worker stays in the view and stops answering.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.runtime.manager import ActiveMemoryManager
from tests.conftest import amm_config
from tests.support.agent import Stub, dial, put, running_agent
from tests.support.waiting import wait_for
from worker_agent.agent import Agent

if TYPE_CHECKING:
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub

DATA = b"goal" * 2500
T = TypeVar("T")


class Goals:
    """An AMM, its control stub, and agents the test can add and crash."""

    def __init__(
        self, amm: AmmServer, control: ActiveMemoryManagerAsyncStub, stack: AsyncExitStack
    ) -> None:
        self.amm = amm
        self.control = control
        self._stack = stack
        self.agents: list[Agent] = []
        self.stubs: list[Stub] = []

    @property
    def manager(self) -> ActiveMemoryManager:
        assert self.amm.manager is not None
        return self.amm.manager

    async def add_agent(self) -> Agent:
        agent = await self._stack.enter_async_context(running_agent())
        self.agents.append(agent)
        self.stubs.append(await self._stack.enter_async_context(dial(agent.address)))
        await self.manager.register(agent.address, agent.address, agent.incarnation)
        return agent

    async def crash(self, address: str) -> None:
        """Stop the agent at ``address`` without telling the AMM."""
        agent = next(a for a in self.agents if a.address == address)
        await agent.stop()

    async def holders(self, key: str) -> set[str]:
        resp = await self.control.WhoHas(control_pb2.WhoHasRequest(keys=[key], fresh=True))
        return set(resp.entries[0].workers)

    async def live_holders(self, key: str) -> set[str]:
        """Holders that answer polls."""
        workers = await self.control.ListWorkers(control_pb2.ListWorkersRequest(fresh=True))
        reachable = {w.address for w in workers.workers if w.missed_polls == 0}
        return await self.holders(key) & reachable

    async def replicate(self, keys: list[str], n: int | None) -> control_pb2.ReplicateResponse:
        return await self.control.Replicate(control_pb2.ReplicateRequest(keys=keys, n=n))

    async def goals(self, *keys: str) -> list[control_pb2.ReplicationGoal]:
        return list((await self.control.ListGoals(control_pb2.ListGoalsRequest(keys=keys))).goals)

    async def run_once(self) -> types_pb2.CycleReport:
        return (await self.control.RunOnce(control_pb2.RunOnceRequest(wait=True))).cycle

    async def settle(self, probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool]) -> T:
        """Run cycles until ``accept(await probe())``: concurrent drops of one key may be refused
        by design (one agent promised a peer to keep the copy it was told to drop), and the
        next cycle asks again."""

        async def cycle_then_probe() -> T:
            await self.run_once()
            return await probe()

        return await wait_for(cycle_then_probe, accept, what="the cluster settled")

    async def totals(self) -> control_pb2.ClusterTotals:
        return (await self.control.GetStatus(control_pb2.GetStatusRequest())).totals


@asynccontextmanager
async def goals_cluster(tmp_path: Path, n: int, **amm_overrides: Any) -> AsyncIterator[Goals]:
    async with AsyncExitStack() as stack:
        config = amm_config(tmp_path, measure="managed", **amm_overrides)
        amm = await stack.enter_async_context(AmmServer(config))
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS)
        )
        cluster = Goals(amm, control_pb2_grpc.ActiveMemoryManagerStub(channel), stack)
        for _ in range(n):
            await cluster.add_agent()
        yield cluster


def ops(report: types_pb2.CycleReport) -> list[str]:
    return [types_pb2.DirectiveOp.Name(r.directive.op) for r in report.directives]


async def test_a_goal_of_3_keeps_3_live_copies_after_a_holder_is_killed(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 4) as c:
        await put(c.stubs[0], "x", DATA)
        assert (await c.replicate(["x"], 3)).goals_set == 1
        report = await c.run_once()
        assert (report.directives_sent, report.applied) == (2, 2)
        # Polled, so the copies made are settled (a fresh WhoHas asks for the key only): an
        # applied copy on a worker that dies before its next poll stays in flight until the
        # worker is dropped, and would be made again only then.
        holders = await c.live_holders("x")
        assert len(holders) == 3
        victim = sorted(holders)[0]
        await c.crash(victim)
        report = await c.run_once()
        assert victim in report.unreachable_workers
        assert ops(report) == ["DIRECTIVE_OP_REPLICATE"]
        assert report.applied == 1
        assert len(await c.live_holders("x")) == 3
        assert victim in await c.holders("x")  # the dead worker's copy is still listed...
        (goal,) = await c.goals("x")
        assert (goal.n, goal.target, goal.live_copies) == (3, 3, 3)  # ...but not counted
        totals = await c.totals()
        assert (totals.keys_with_goal, totals.keys_below_goal) == (1, 0)
        for _ in range(5):  # steady: nothing to add, nothing to drop
            assert (await c.run_once()).suggestions == 0
        assert len(await c.live_holders("x")) == 3


async def test_a_goal_of_every_worker_reaches_a_worker_that_joins_later(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 2) as c:
        await put(c.stubs[0], "x", DATA)
        await c.replicate(["x"], None)
        await c.run_once()
        assert await c.holders("x") == {a.address for a in c.agents}
        newcomer = await c.add_agent()
        assert newcomer.address not in await c.holders("x")  # polled: it runs, holds nothing
        (goal,) = await c.goals("x")
        assert not goal.HasField("n")
        assert (goal.target, goal.live_copies) == (3, 2)
        assert (await c.totals()).keys_below_goal == 1
        report = await c.run_once()
        assert [r.worker for r in report.directives] == [newcomer.address]
        assert newcomer.address in await c.holders("x")
        assert (await c.totals()).keys_below_goal == 0


async def test_replicate_and_reduce_replicas_never_fight(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 4) as c:
        await put(c.stubs[0], "two", DATA)
        await put(c.stubs[0], "all", DATA)
        await put(c.stubs[0], "one", DATA)
        for stub in c.stubs[1:]:  # "one" starts on every worker, without a goal
            await put(stub, "one", DATA)
        await c.replicate(["two"], 2)
        await c.replicate(["all"], None)
        expected = {"two": 2, "all": 4, "one": 1}

        async def counts() -> dict[str, int]:
            return {k: len(await c.holders(k)) for k in expected}

        await c.settle(counts, lambda found: found == expected)
        for _ in range(20):
            report = await c.run_once()
            assert report.suggestions == 0
            assert report.rejected == 0
        assert {k: len(await c.holders(k)) for k in expected} == expected


async def test_goals_survive_an_amm_restart(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 3) as c:
        await put(c.stubs[0], "x", DATA)
        await c.replicate(["x"], 3)
        await c.run_once()
        assert len(await c.holders("x")) == 3
        addresses = [a.address for a in c.agents]
        before = c.amm.epoch
        await c.amm.stop()
        async with AmmServer(amm_config(tmp_path, measure="managed")) as again:
            manager = again.manager
            assert manager is not None
            assert manager.epoch > before
            assert set(manager.state.worker_ids) == set(addresses)  # taken back from the state
            (goal,) = await manager.queries.goal_statuses(["x"])
            assert (goal.n, goal.live) == (3, 3)
            record = await manager.run_cycle(wait=True)
            assert record.directives == {}  # without the goal, ReduceReplicas would drop two


async def test_n_1_removes_the_goal_and_the_key_goes_back_to_one_copy(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 3) as c:
        await put(c.stubs[0], "x", DATA)
        await c.replicate(["x"], 3)
        await c.run_once()
        assert len(await c.holders("x")) == 3
        removed = await c.replicate(["x"], 1)
        assert (removed.goals_set, removed.goals_removed) == (0, 1)
        assert await c.goals() == []
        assert (await c.totals()).keys_with_goal == 0
        assert ops(await c.run_once()) == ["DIRECTIVE_OP_DROP"] * 2
        await c.settle(lambda: c.holders("x"), lambda hs: len(hs) == 1)
        again = await c.replicate(["x"], 1)
        assert (again.goals_set, again.goals_removed) == (0, 0)


async def test_setting_the_same_goal_again_changes_nothing(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 2) as c:
        await put(c.stubs[0], "x", DATA)
        await put(c.stubs[0], "y", DATA)
        assert (await c.replicate(["x"], 2)).goals_set == 1
        assert (await c.replicate(["x", "y", "x"], 2)).goals_set == 1
        assert (await c.replicate(["x"], None)).goals_set == 1
        assert [(g.key, g.HasField("n")) for g in await c.goals()] == [("x", False), ("y", True)]
        kinds = [e.kind for e in c.manager.events.recent()]
        assert kinds.count("goal-set") == 3


async def test_forget_removes_the_goal(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 2) as c:
        await put(c.stubs[0], "x", DATA)
        await c.replicate(["x"], None)
        await c.run_once()
        resp = await c.control.Forget(control_pb2.ForgetRequest(keys=["x"]))
        assert resp.replicas_deleted == 2
        assert await c.goals() == []
        assert (await c.run_once()).suggestions == 0


async def test_the_goal_of_a_lost_key_is_reported_and_can_be_removed(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 2) as c:
        await put(c.stubs[0], "x", DATA)
        await c.replicate(["x"], 2)
        await c.control.UnregisterWorker(
            control_pb2.UnregisterWorkerRequest(address=c.agents[0].address)
        )
        (goal,) = await c.goals("x")
        assert (goal.target, goal.live_copies) == (1, 0)
        assert (await c.totals()).keys_below_goal == 1
        assert (await c.run_once()).suggestions == 0  # nothing to copy from
        assert (await c.replicate(["x"], 1)).goals_removed == 1


async def test_a_key_put_a_moment_ago_is_found_without_waiting_for_a_cycle(
    tmp_path: Path,
) -> None:
    async with goals_cluster(tmp_path, 2) as c:
        await put(c.stubs[1], "fresh", DATA)  # no poll has seen it yet
        assert (await c.replicate(["fresh"], 2)).goals_set == 1


@pytest.mark.parametrize(
    ("keys", "n", "code", "message"),
    [
        (["x"], 0, grpc.StatusCode.INVALID_ARGUMENT, "n = 0 is not a goal"),
        ([], 2, grpc.StatusCode.INVALID_ARGUMENT, "no keys given"),
        (["x", ""], 2, grpc.StatusCode.INVALID_ARGUMENT, "keys must not be empty strings"),
        (["x", "ghost", "phantom"], 2, grpc.StatusCode.NOT_FOUND, "'ghost', 'phantom'"),
    ],
)
async def test_bad_replicate_requests_get_clear_statuses(
    tmp_path: Path, keys: list[str], n: int, code: grpc.StatusCode, message: str
) -> None:
    async with goals_cluster(tmp_path, 1) as c:
        await put(c.stubs[0], "x", DATA)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.replicate(keys, n)
        assert err.value.code() == code
        assert message in (err.value.details() or "")
        assert await c.goals() == []


async def test_listing_the_goal_of_a_key_without_one_is_not_found(tmp_path: Path) -> None:
    async with goals_cluster(tmp_path, 1) as c:
        await put(c.stubs[0], "x", DATA)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.goals("x")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no replication goal for key(s): 'x'" in (err.value.details() or "")


async def test_a_goal_set_on_a_running_amm_is_acted_on_at_once_not_an_interval_later(
    tmp_path: Path,
) -> None:
    async with goals_cluster(tmp_path, 3, interval="60s", start=True) as c:
        await put(c.stubs[0], "x", DATA)
        await wait_for(lambda: c.manager.cycles >= 1, what="the first cycle")
        await c.replicate(["x"], 3)
        await wait_for(
            lambda: c.holders("x"), lambda holders: len(holders) == 3, what="three copies"
        )
