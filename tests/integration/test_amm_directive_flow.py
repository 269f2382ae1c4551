"""How directives flow at scale: a directive an agent still holds is never planned again under a
new id, agents are fed while a big cycle plans, and the AMM stays responsive while a big cycle
plans and sends."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.view import Key, WorkerId
from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.links.dispatcher import BATCH, Dispatcher
from amm_service.runtime.manager import ActiveMemoryManager
from amm_service.runtime.records.cycle import CycleRecord
from tests.conftest import amm_config
from tests.support.agent import inventory_answer
from tests.support.faults import amm_with_fake_peers, fake_peer
from tests.support.policies import Watched
from tests.support.waiting import wait_for

DIGEST = "a" * 64


class _SlowAgent(agent_pb2_grpc.WorkerAgentServicer):
    """Holds key "x"; takes every directive and answers none until ``release`` is set."""

    def __init__(self, name: str, *, batches: bool) -> None:
        self.name = name
        self.features = ["directive-batches"] if batches else []
        self.received: list[str] = []
        self.release = asyncio.Event()

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return agent_pb2.PollResponse(
            incarnation=self.name,
            version=1,
            full=True,
            keys=[types_pb2.KeyInfo(key="x", size=1, checksum=DIGEST)],
            status=types_pb2.WORKER_STATUS_RUNNING,
            features=self.features,
        )

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async def read() -> None:
            async for request in request_iterator:
                batch = list(request.batch) or [request.directive]
                self.received.extend(d.id for d in batch)

        reader = asyncio.create_task(read())
        try:
            await self.release.wait()
            yield agent_pb2.DirectivesResponse(
                batch=[
                    types_pb2.DirectiveOutcome(
                        directive_id=directive_id,
                        status=types_pb2.OUTCOME_STATUS_REFUSED,
                        reason=types_pb2.REFUSAL_REASON_PINNED,
                    )
                    for directive_id in self.received
                ]
            )
            await reader
        finally:
            reader.cancel()


async def cycle_while_asking(
    manager: ActiveMemoryManager, channel: grpc.aio.Channel, answered: list[float]
) -> CycleRecord:
    """One cycle of ``manager`` while a client calls ``Running`` back to back, noting in
    ``answered`` when each call is answered; the cycle's record."""
    stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)

    async def ask() -> None:
        while True:
            await stub.Running(control_pb2.RunningRequest())
            answered.append(time.monotonic())

    asking = asyncio.create_task(ask())
    await wait_for(lambda: len(answered) > 3, what="control calls are answered")
    try:
        return await manager.run_cycle()
    finally:
        asking.cancel()


async def test_a_directive_the_agent_still_holds_is_sent_again_under_its_id_never_replanned(
    tmp_path: Path,
) -> None:
    one = _SlowAgent("one", batches=True)  # type: ignore[abstract]
    two = _SlowAgent("two", batches=False)  # type: ignore[abstract]
    config = amm_config(tmp_path, directive_timeout="300ms")
    async with amm_with_fake_peers(config, {"one": one, "two": two}) as (_, manager, _):
        first = await manager.run_cycle()
        assert first.planned_count == 1  # ReduceReplicas drops one of the two copies of x
        (sent,) = first.directives
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(one.received + two.received) < 3:
            await asyncio.sleep(0.35)  # past the directive timeout, then one more cycle
            record = await manager.run_cycle()
            assert record.planned_count == 0, "x is in flight: nothing new is planned"
        received = one.received + two.received
        assert len(received) >= 3, "the overdue directive was sent again"
        assert set(received) == {sent}, "always under its first id"
        assert list(manager.ledger.in_flight(Key("x")).dropping) == [
            WorkerId(first.directives[sent].directive.worker)
        ]
        totals = manager.outcomes.totals
        assert (totals.sent, totals.refused, totals.failed) == (len(received), 0, 0)
        one.release.set()
        two.release.set()
        await wait_for(lambda: len(manager.ledger) == 0, what="the refusal settles x")
        assert manager.outcomes.totals.refused == 1, "answered once, however often it was sent"


class _BigAgent(agent_pb2_grpc.WorkerAgentServicer):
    """Holds ``keys`` keys (all of them also on its twin); reads directives, answers none."""

    def __init__(self, name: str, keys: int) -> None:
        self.name = name
        self.inventory = [
            types_pb2.KeyInfo(key=f"key-{i:06d}", size=1, checksum=DIGEST) for i in range(keys)
        ]

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return inventory_answer(request, self.name, self.inventory, ["directive-batches"])

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in request_iterator:
            pass
        yield agent_pb2.DirectivesResponse()  # pragma: no cover


async def test_control_calls_are_answered_while_a_big_cycle_plans(tmp_path: Path) -> None:
    """A cycle that plans 40,000 drops must not hold the event loop: control calls made
    meanwhile are answered before the plan is done."""
    config = amm_config(tmp_path, policies=[{"class": "tests.support.policies.Watched"}])
    answered: list[float] = []
    moments: dict[str, int] = {}
    async with (
        AmmServer(config) as amm,
        fake_peer(_BigAgent("one", 40_000)) as one,  # type: ignore[abstract]
        fake_peer(_BigAgent("two", 40_000)) as two,  # type: ignore[abstract]
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        manager = amm.manager
        assert manager is not None
        (policy,) = manager.policies
        assert isinstance(policy, Watched)

        def probe(moment: str) -> None:
            moments.setdefault(moment, len(answered))

        policy.probe = probe
        await manager.register(one, "one", "one")
        await manager.register(two, "two", "two")
        await manager.queries.refresh(True)  # both inventories are in before the cycle
        record = await cycle_while_asking(manager, channel, answered)
        assert record.planned_count == 40_000
        during = moments["done"] - moments["first suggestion"]
        assert during >= 2, f"only {during} control calls were answered while planning"


class _KeepingUpAgent(_BigAgent):
    """Holds ``keys`` keys (all of them also on its twin); answers every message at once, all
    APPLIED, and notes how many suggestions the cycle's policy had made (``made``) when each
    message came in."""

    def __init__(self, name: str, keys: int, made: Callable[[], int]) -> None:
        super().__init__(name, keys)
        self.made = made
        self.arrivals: list[int] = []
        self.received = 0

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            self.arrivals.append(self.made())
            self.received += len(request.batch)
            yield agent_pb2.DirectivesResponse(
                batch=[
                    types_pb2.DirectiveOutcome(
                        directive_id=directive.id,
                        status=types_pb2.OUTCOME_STATUS_APPLIED,
                        inventory_version=2,
                    )
                    for directive in request.batch
                ]
            )


async def test_agents_that_keep_up_are_fed_all_along_a_big_cycle(tmp_path: Path) -> None:
    """The first drops of a big cycle go out as soon as a slice of them is planned, and an agent
    that has answered what it got is sent more while the rest is planned: it never waits for
    a big slice to be planned (sent 20,000 at a time, each agent waited for half of this plan
    before its first directive, and idled between slices)."""
    config = amm_config(tmp_path, policies=[{"class": "tests.support.policies.Watched"}])
    async with AmmServer(config) as amm:
        manager = amm.manager
        assert manager is not None
        (policy,) = manager.policies
        assert isinstance(policy, Watched)
        agents = [
            _KeepingUpAgent(name, 40_000, lambda: policy.made)  # type: ignore[abstract]
            for name in ("one", "two")
        ]
        async with fake_peer(agents[0]) as one, fake_peer(agents[1]) as two:
            await manager.register(one, "one", "one")
            await manager.register(two, "two", "two")
            await manager.queries.refresh(True)  # both inventories are in before the cycle
            record = await manager.run_cycle()
            assert record.planned_count == 40_000
            await wait_for(
                lambda: sum(agent.received for agent in agents) == 40_000,
                what="every directive reaches its agent",
            )
    for agent in agents:
        made = agent.arrivals
        assert made[0] <= 5_000, f"{agent.name}'s first directives came {made[0]:,} drops in"
        waited = max(later - earlier for earlier, later in itertools.pairwise(made))
        assert waited <= 10_000, f"{agent.name} waited while {waited:,} drops were planned"


class _GrowingAgent(_BigAgent):
    """Reports nothing at first, then ``keys`` new keys at once, in one incremental answer."""

    def __init__(self, name: str, keys: int, returned: Callable[[], None]) -> None:
        super().__init__(name, keys)
        self.returned = returned

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        if request.since_version < 1 or request.incarnation != self.name:
            return agent_pb2.PollResponse(
                incarnation=self.name,
                version=1,
                full=True,
                status=types_pb2.WORKER_STATUS_RUNNING,
                features=["directive-batches"],
            )
        grown = request.since_version == 1
        if grown:
            self.returned()
        return agent_pb2.PollResponse(
            incarnation=self.name,
            version=2,
            keys=self.inventory if grown else [],
            status=types_pb2.WORKER_STATUS_RUNNING,
            features=["directive-batches"],
        )


async def test_control_calls_are_answered_while_a_cycle_merges_big_poll_answers(
    tmp_path: Path,
) -> None:
    """Two agents that each report 40,000 new keys in one answer to a cycle's poll: control
    calls made meanwhile are answered while the answers are read and merged."""
    config = amm_config(tmp_path, policies=[{"class": "tests.support.policies.Watched"}])
    answered: list[float] = []
    moments: dict[str, int] = {}

    def moment(name: str) -> None:
        moments.setdefault(name, len(answered))

    def grown() -> None:
        moment("answered")

    async with (
        AmmServer(config) as amm,
        fake_peer(_GrowingAgent("one", 40_000, grown)) as one,  # type: ignore[abstract]
        fake_peer(_GrowingAgent("two", 40_000, grown)) as two,  # type: ignore[abstract]
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        manager = amm.manager
        assert manager is not None
        (policy,) = manager.policies
        assert isinstance(policy, Watched)
        policy.probe = moment
        await manager.register(one, "one", "one")
        await manager.register(two, "two", "two")
        assert manager.state.nkeys == 0
        after_round = manager._poller._on_round
        assert after_round is not None

        async def merged() -> None:  # every answer of the round is merged: what comes after
            moment("merged")  # (recording the keys held) lets the loop in as well
            await after_round()

        manager._poller._on_round = merged
        record = await cycle_while_asking(manager, channel, answered)
        assert manager.state.nkeys == 40_000
        assert record.planned_count == 40_000
        during = moments["merged"] - moments["answered"]
        assert during >= 4, f"only {during} control calls were answered while merging"


class _BusyAgent(agent_pb2_grpc.WorkerAgentServicer):
    """Reads no directive until ``release`` is set (its hands are full), then notes the size
    of each message it reads; answers none."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sizes: list[int] = []

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        await self.release.wait()
        async for request in request_iterator:
            self.sizes.append(len(request.batch))
        yield agent_pb2.DirectivesResponse()  # pragma: no cover


async def test_slices_queued_while_an_agent_is_busy_go_out_as_one_message() -> None:
    """Slices sent to an agent that reads nothing meanwhile (flow control holds the stream)
    are joined into messages of up to ``BATCH`` when it reads again: small slices that keep an
    agent fed must not become a message each, a task and a promise per keeper each, once it
    falls behind."""
    agent = _BusyAgent()  # type: ignore[abstract]
    links = AgentLinks()
    dispatcher = Dispatcher(links, lambda worker, outcomes: None, lambda worker: True)
    ids = itertools.count()

    def drops(n: int) -> list[Directive]:
        return [
            Directive(
                f"d{next(ids)}", 1, Op.DROP, Key(f"key-{i:06d}-{'x' * 80}"), worker, 100, DIGEST
            )
            for i in range(n)
        ]

    try:
        async with fake_peer(agent) as address:
            worker = WorkerId(address)
            big = drops(8 * BATCH)  # more than the stream's flow-control window holds
            await dispatcher.send(big)
            await asyncio.sleep(0.2)  # the stream writes what the window lets through
            small = [drops(300) for _ in range(10)]
            for one in small:
                await dispatcher.send(one)
            agent.release.set()
            total = len(big) + 3_000
            await wait_for(lambda: sum(agent.sizes) == total, what="every directive is read")
    finally:
        await dispatcher.close()
        await links.close_all()
    assert agent.sizes[:8] == [BATCH] * 8
    assert agent.sizes[8:] == [3_000], "the ten slices queued meanwhile went out as one message"


async def test_a_cycle_plans_and_sends_while_the_rounds_bookkeeping_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ends a round of polls and no plan reads (notes of keys being stored, the keys held
    written to the state file) runs while the cycle plans and sends: after a 100k-key put on 4
    agents it held the first drop back by 0.6-0.8 s. The cycle still ends only once it is done."""
    one = _SlowAgent("one", batches=True)  # type: ignore[abstract]
    two = _SlowAgent("two", batches=True)  # type: ignore[abstract]
    async with amm_with_fake_peers(amm_config(tmp_path), {"one": one, "two": two}) as cluster:
        manager = cluster.manager
        books = asyncio.Event()
        judged: list[bool] = []
        judge = manager.storing.polled

        async def held_back(state: Any) -> None:
            await books.wait()
            await judge(state)
            judged.append(True)

        monkeypatch.setattr(manager.storing, "polled", held_back)
        cycle = asyncio.create_task(manager.run_cycle())
        try:
            await wait_for(
                lambda: len(one.received + two.received) == 1,
                what="a drop of x sent while the round's bookkeeping waits",
            )
            await asyncio.sleep(0.05)
            assert not cycle.done(), "the cycle ended before the round's bookkeeping"
            books.set()
            record = await asyncio.wait_for(cycle, 10)
        finally:
            books.set()
            cycle.cancel()
        assert record.planned_count == 1
        assert judged == [True]
        one.release.set()
        two.release.set()
