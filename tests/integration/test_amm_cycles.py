"""The AMM steering real agents: cycles, ReduceReplicas, pins, in-flight accounting, Forget, and a
stale AMM that cannot act. AMM and agents are real grpc.aio servers in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from amm import AsyncClient
from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.models import Event
from amm.v1 import agent_pb2, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.view import Key, WorkerId
from amm_service.runtime.records.state import FIRST_EPOCHS, StateStore
from tests.conftest import amm_config
from tests.support.agent import agents, get, put
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.store import Key as StoreKey

if TYPE_CHECKING:
    from amm.v1.agent_pb2_grpc import WorkerAgentAsyncStub
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub

DATA = b"0123456789" * 1000


class Cluster:
    """An AMM, its control stub and N agents with their stubs."""

    def __init__(
        self,
        amm: AmmServer,
        control: ActiveMemoryManagerAsyncStub,
        workers: list[tuple[Agent, WorkerAgentAsyncStub]],
    ) -> None:
        self.amm = amm
        self.control = control
        self.agents = [a for a, _ in workers]
        self.stubs = [s for _, s in workers]
        self.addresses = [a.address for a in self.agents]

    async def has_what(self) -> dict[str, set[str]]:
        resp = await self.control.HasWhat(control_pb2.HasWhatRequest(fresh=True))
        return {e.worker: set(e.keys) for e in resp.entries}

    async def holders(self, key: str) -> set[str]:
        resp = await self.control.WhoHas(control_pb2.WhoHasRequest(keys=[key], fresh=True))
        return set(resp.entries[0].workers)

    async def run_once(self, wait: bool = True) -> types_pb2.CycleReport:
        return (await self.control.RunOnce(control_pb2.RunOnceRequest(wait=wait))).cycle

    async def spread(self, key: str, data: bytes = DATA) -> None:
        """Put ``key`` on the first agent and read it through every other one."""
        await put(self.stubs[0], key, data)
        for stub in self.stubs[1:]:
            await get(stub, key, sources=[self.addresses[0]])


@asynccontextmanager
async def cluster(
    tmp_path: Path, n: int, *, lease: float = 5.0, **amm_overrides: Any
) -> AsyncIterator[Cluster]:
    overrides = {"measure": "managed", **amm_overrides}
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(AmmServer(amm_config(tmp_path, **overrides)))
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS)
        )
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        workers = await stack.enter_async_context(agents(n, amm=amm.address, lease=lease))

        async def count() -> int:
            resp = await control.ListWorkers(control_pb2.ListWorkersRequest())
            return len(resp.workers)

        await wait_for(count, lambda c: c == n, what="agents registered")
        yield Cluster(amm, control, workers)


async def test_reduce_replicas_keeps_exactly_one_replica(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as c:
        await c.spread("x")
        await c.spread("y")
        assert await c.holders("x") == set(c.addresses)
        report = await c.run_once()
        assert report.directives_sent == 4
        assert report.applied == 4
        assert len(await c.holders("x")) == 1
        assert len(await c.holders("y")) == 1
        again = await c.run_once()
        assert again.directives_sent == 0


async def test_applied_drops_leave_the_ledger_without_waiting_for_the_next_poll(
    tmp_path: Path,
) -> None:
    """The agents say when each key was gone: the view takes the drops in, and the ledger
    settles them, as their outcomes arrive (a big cycle's 300k drops held ~880 B each in the
    ledger till the next cycle's poll)."""
    async with cluster(tmp_path, 3) as c:
        await c.spread("x")
        await c.spread("y")
        report = await c.run_once()  # waits for the outcomes, polls no more
        assert (report.directives_sent, report.applied) == (4, 4)
        status = await c.control.GetStatus(control_pb2.GetStatusRequest())
        assert status.totals.directives_in_flight == 0
        manager = c.amm.manager
        assert manager is not None
        assert len(manager.ledger) == 0
        assert manager.ledger.in_flight(Key("x")) == manager.ledger.in_flight(Key("none"))


async def test_keys_pinned_on_several_workers_keep_those_replicas(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3, lease=0.3) as c:
        await c.spread("x")
        for stub in c.stubs[:2]:
            await stub.Pin(agent_pb2.PinRequest(key="x"))
        await c.run_once()
        assert await c.holders("x") == set(c.addresses[:2])
        await c.stubs[1].Unpin(agent_pb2.UnpinRequest(key="x"))

        async def cycle_then_holders() -> set[str]:
            await c.run_once()
            return await c.holders("x")

        # The worker that kept x for the first drop refuses to drop it until its lease ends.
        await wait_for(cycle_then_holders, lambda hs: hs == {c.addresses[0]}, within=5.0)


async def test_a_cycle_with_refused_drops_records_one_directives_refused_event(
    tmp_path: Path,
) -> None:
    """Two drops refused (each key is being read on every holder, which polls do not show) make
    one event for their cycle, counted by reason, in WatchEvents and GetStatus alike; a cycle
    whose drops are applied makes none."""
    async with cluster(tmp_path, 2) as c:
        keys = [StoreKey("a"), StoreKey("b")]
        for key in keys:
            await c.spread(key)
            for agent in c.agents:
                agent.store.begin_use(key)  # a streaming read: drops refused IN_USE
        report = await c.run_once()
        assert (report.directives_sent, report.refused) == (2, 2)

        async with AsyncClient(c.amm.address, timeout=20) as client:

            async def refused_events() -> list[Event]:
                return [e async for e in client.events(kinds="directives-refused")]  # type: ignore[misc]

            (event,) = await wait_for(refused_events, lambda es: len(es) == 1, within=10.0)
            assert event.message.startswith(f"cycle {report.number}: 2 refused")
            assert event.message.endswith(": in_use 2")
            assert event.keys == ("a", "b")
            assert event.worker in {"", *c.addresses}
            assert ("by 2 workers" in event.message) == (event.worker == "")
            status = await client.status()
            assert [e for e in status.recent_events if e.kind == "directives-refused"] == [event]

            for key in keys:
                for agent in c.agents:
                    agent.store.end_use(key)
            applied = await c.run_once()
            assert (applied.directives_sent, applied.applied) == (2, 2)
            assert await refused_events() == [event]


async def test_back_to_back_cycles_never_drop_more_than_the_excess(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4) as c:
        for i in range(20):
            await c.spread(f"k{i}")
        reports = [await c.run_once(wait=False) for _ in range(3)]
        assert sum(r.directives_sent for r in reports) == 20 * 3
        await wait_for(c.has_what, lambda hw: sum(len(ks) for ks in hw.values()) == 20)
        placement = await c.has_what()
        assert set().union(*placement.values()) == {f"k{i}" for i in range(20)}


async def test_the_loop_removes_duplicates_once_started(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, interval="50ms") as c:
        await c.spread("x")
        await c.control.Start(control_pb2.StartRequest())
        await wait_for(lambda: c.holders("x"), lambda hs: len(hs) == 1, what="one replica left")
        status = await c.control.GetStatus(control_pb2.GetStatusRequest())
        assert status.running
        assert status.totals.keys == 1
        assert status.totals.replicas == 1
        assert status.totals.workers == 2


async def test_a_hostile_policy_cannot_drop_the_last_replica(tmp_path: Path) -> None:
    policies = [{"class": "tests.support.policies.DropEverything"}]
    async with cluster(tmp_path, 3, policies=policies) as c:
        await c.spread("x")
        await put(c.stubs[1], "solo", DATA)
        report = await c.run_once()
        assert report.directives_sent == 2
        assert report.applied == 2
        assert {r.reason for r in report.rejections} == {"last replica"}
        assert report.rejected == 2 * 3 + 2 - 2
        assert len(await c.holders("x")) == 1
        assert await c.holders("solo") == {c.addresses[1]}
        for _ in range(3):
            assert (await c.run_once()).directives_sent == 0


async def test_forget_deletes_every_replica(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as c:
        await c.spread("x")
        await c.spread("y")
        resp = await c.control.Forget(control_pb2.ForgetRequest(keys=["x"]))
        assert resp.replicas_deleted == 3
        hw = await c.has_what()
        assert all(keys == {"y"} for keys in hw.values())
        await c.stubs[0].Pin(agent_pb2.PinRequest(key="y"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.control.Forget(control_pb2.ForgetRequest(keys=["y"]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert c.addresses[0] in (err.value.details() or "")
        assert await c.holders("y") == {c.addresses[0]}


async def test_forget_is_not_held_back_by_keep_promises(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, lease=30.0) as c:
        await c.spread("x")
        report = await c.run_once()
        assert report.applied == 1
        (survivor,) = await c.holders("x")
        stub = c.stubs[c.addresses.index(survivor)]
        # The survivor promised the dropper to keep x: a plain delete is refused...
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Delete(agent_pb2.DeleteRequest(key="x"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "promised" in (err.value.details() or "")
        # ...but forgetting the key everywhere does not need that promise.
        resp = await c.control.Forget(control_pb2.ForgetRequest(keys=["x"]))
        assert resp.replicas_deleted == 1


async def test_a_stale_amm_cannot_act(tmp_path: Path) -> None:
    """An AMM whose agents report a newer epoch is fenced off: it sends nothing, stops cycling,
    says so once (``epoch-fenced``) and answers Running false, fenced (issue 10: it kept
    answering running and sending directives the agents refused)."""
    # The agents' AMM runs under an epoch above any a fresh AMM begins at.
    current_state = tmp_path / "current.sqlite3"
    with StateStore(str(current_state)) as store:
        store.raise_epoch(FIRST_EPOCHS)
    async with (
        cluster(tmp_path, 2, state_path=str(current_state)) as c,
        AmmServer(amm_config(tmp_path, state_path=str(tmp_path / "old.sqlite3"))) as old,
        grpc.aio.insecure_channel(old.address, options=CHANNEL_OPTIONS) as channel,
    ):
        await c.spread("x")
        # An older AMM (a fresh one) that still believes it is in charge polls the same agents.
        manager = old.manager
        assert manager is not None
        assert old.epoch < c.amm.epoch
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        for agent in c.agents:
            await manager.register(agent.address, agent.address, agent.incarnation)
        await control.Start(control_pb2.StartRequest())
        await wait_for(lambda: not manager.running, what="the fenced AMM stopped cycling")
        running = await control.Running(control_pb2.RunningRequest())
        assert (running.running, running.fenced) == (False, True)
        status = await control.GetStatus(control_pb2.GetStatusRequest())
        assert (status.running, status.fenced) == (False, True)
        assert status.fenced_by_epoch == c.amm.epoch
        assert [e.kind for e in status.recent_events].count("epoch-fenced") == 1
        assert manager.outcomes.totals.sent == 0, "nothing sent: the agents would refuse it"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await control.Start(control_pb2.StartRequest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        record = await manager.run_cycle(wait=True)
        assert not record.directives
        assert manager.events.counts["epoch-fenced"] == 1, "said once"
        assert await c.holders("x") == set(c.addresses)
        # Nor does it poll the other AMM's agents while stopped, as an AMM in charge does.
        polled = [w.last_poll for w in manager.state.workers]
        await asyncio.sleep(5 * manager.config.interval)  # a poll would have come by now
        assert [w.last_poll for w in manager.state.workers] == polled


async def test_conflicting_content_is_reported_and_left_alone(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        await put(c.stubs[0], "x", b"one")
        await put(c.stubs[1], "x", b"two")
        report = await c.run_once()
        assert report.directives_sent == 0
        status = await c.control.GetStatus(control_pb2.GetStatusRequest())
        assert status.totals.conflicting_keys == 1
        assert await c.holders("x") == set(c.addresses)


async def test_the_amm_sees_a_large_inventory_through_paged_polls(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        one = checksum(b"v")
        for i in range(25_000):  # setup only: 25,000 Puts would take a while
            c.agents[0].store.add(StoreKey(f"key-{i:05d}"), b"v", one)
        await put(c.stubs[0], "shared", DATA)
        await get(c.stubs[1], "shared", sources=[c.addresses[0]])
        hw = await c.has_what()
        assert len(hw[c.addresses[0]]) == 25_001
        assert hw[c.addresses[1]] == {"shared"}
        # Changes after the snapshot arrive incrementally; the duplicate is dropped.
        c.agents[0].store.remove(StoreKey("key-00000"))
        report = await c.run_once()
        assert report.applied == 1
        hw = await c.has_what()
        assert sum(len(keys) for keys in hw.values()) == 25_000


async def test_a_fresh_amm_moves_past_the_epoch_its_agents_have_seen(tmp_path: Path) -> None:
    """The AMM's state file was lost: it restarts afresh while its agents served a newer epoch."""
    async with (
        AmmServer(amm_config(tmp_path)) as fresh,
        agents(2, amm=fresh.address) as pairs,
    ):
        seen = fresh.epoch + 6
        for agent, stub in pairs:
            await put(stub, "y", DATA)
            agent.node.observe_epoch(seen)  # the old AMM had confirmed its epoch to them
        assert fresh.manager is not None
        for agent, _ in pairs:
            await fresh.manager.register(agent.address, "", agent.incarnation, epoch=seen)
        assert fresh.epoch == seen + 1
        record = await fresh.manager.run_cycle(wait=True)
        outcomes = [r.outcome for r in record.directives.values()]
        assert [o.status.value for o in outcomes if o is not None] == ["applied"]


async def test_an_agent_that_leaves_is_forgotten(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        await c.spread("x")
        await c.agents[1].stop()
        await wait_for(lambda: c.has_what(), lambda hw: list(hw) == [c.addresses[0]])
        report = await c.run_once()
        assert report.directives_sent == 0


async def test_a_cycle_cut_short_by_a_cancelled_call_does_not_end_the_loop(tmp_path: Path) -> None:
    policies = [{"class": "tests.support.policies.CutShortOnce"}]
    config = amm_config(tmp_path, policies=policies, interval="20ms", start=True)
    async with AmmServer(config) as amm:
        manager = amm.manager
        assert manager is not None
        await wait_for(lambda: manager.cycles >= 3, what="cycles after the one cut short")
        assert manager.running
    # Stopping still works: a real cancellation of the loop is not swallowed.
    assert not manager.running


async def test_applied_drops_show_in_the_view_before_the_next_poll(tmp_path: Path) -> None:
    """What the AMM answers from its view (HasWhat, WhoHas, ListWorkers without ``fresh``)
    shows the drops once their outcomes are in, while the view of each worker is still at the
    inventory version of the poll before them: no poll brought them."""
    async with cluster(tmp_path, 3) as c:
        keys = [f"k{i}" for i in range(20)]
        for key in keys:
            await c.spread(key)
        manager = c.amm.manager
        assert manager is not None
        before = {a.address: a.node.store.version for a in c.agents}
        report = await c.run_once()
        assert (report.directives_sent, report.applied) == (40, 40)
        views = {a: manager.state.worker(WorkerId(a)) for a in c.addresses}
        polled = {a: known.version for a, known in views.items() if known is not None}
        assert polled == before, "no poll since the one the cycle planned on"
        assert all(a.node.store.version > before[a.address] for a in c.agents), "all dropped"
        has_what = await c.control.HasWhat(control_pb2.HasWhatRequest())
        assert sum(len(e.keys) for e in has_what.entries) == len(keys)
        who_has = await c.control.WhoHas(control_pb2.WhoHasRequest(keys=keys))
        assert [len(e.workers) for e in who_has.entries] == [1] * len(keys)
        listed = await c.control.ListWorkers(control_pb2.ListWorkersRequest())
        assert sum(w.key_count for w in listed.workers) == len(keys)
        # The next poll agrees, and changes nothing the view shows.
        assert [len(await c.holders(key)) for key in keys] == [1] * len(keys)
