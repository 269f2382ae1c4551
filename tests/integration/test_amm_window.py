"""A big cycle plans no further ahead of its agents than keeps them busy (``cycling.FEED``): what
it has sent and not had answered stays within the window while every directive is carried out,
and an agent that stops answering, or whose stream breaks, stalls neither the others nor the
cycle. AMM and agents are real grpc.aio servers in this process; the window is made small so a
few thousand keys make a big cycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from amm.base import malloc
from amm.base.checksum import checksum
from amm_service.api.server import AmmServer
from amm_service.decisions import core
from amm_service.decisions.view import WorkerId
from amm_service.runtime.cycles import cycling
from amm_service.runtime.manager import ActiveMemoryManager
from tests.conftest import amm_config
from tests.support.agent import agents
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.directives import Outcome
from worker_agent.store import Key

#: Keys held by every agent: a cycle drops all but one replica of each.
KEYS = 1_500
FEED = 60
FEED_STEP = 20
#: The directives of a whole cycle, as planned ahead without a window.
AGENTS = 3
DROPS = KEYS * (AGENTS - 1)


@pytest.fixture(autouse=True)
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cycling, "FEED", FEED)
    monkeypatch.setattr(cycling, "FEED_STEP", FEED_STEP)
    monkeypatch.setattr(core, "STEP", 16)


class Window:
    """What a cycle sent while its agents had what to do, noted at each of its sends: the sends
    made although every agent the send before went to had ``FEED`` in hand then (in hand only
    grows at a send: so they had had it all along, and the cycle planned ahead of them). An
    agent that stalls a moment is sent its share while the others are fed: what is in flight
    is bounded by the window only while the agents keep pace."""

    def __init__(self, manager: ActiveMemoryManager) -> None:
        self.sends = self.ahead = 0
        dispatcher = manager._dispatcher
        send = dispatcher.send
        before: set[WorkerId] = set()

        async def noted(directives: Sequence[Any]) -> None:
            nonlocal before
            if before and all(dispatcher.in_hand(worker) >= FEED for worker in before):
                self.ahead += 1
            before = {d.worker for d in directives}
            self.sends += 1
            await send(directives)

        dispatcher.send = noted  # type: ignore[method-assign]


def silence(agent: Agent) -> asyncio.Event:
    """Have ``agent`` take directives and answer none until the event returned is set (it
    still polls and answers polls)."""
    speak = asyncio.Event()
    run = agent.node.run_directive_batch

    async def held(directives: Sequence[Any], emit: Callable[[list[Outcome]], None]) -> None:
        await speak.wait()
        await run(directives, emit)

    agent.node.run_directive_batch = held  # type: ignore[method-assign]
    return speak


@asynccontextmanager
async def cluster(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[AmmServer, list[Agent]]]:
    """An AMM and ``AGENTS`` agents, each holding the same ``KEYS`` keys."""
    config = amm_config(tmp_path, **{"measure": "managed", **overrides})
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(AmmServer(config))
        started = await stack.enter_async_context(agents(AGENTS, amm=amm.address))
        workers = [agent for agent, _ in started]
        data = b"v"
        for agent in workers:
            agent.store.add_many((Key(f"k{i:05d}"), data, checksum(data)) for i in range(KEYS))
        manager = amm.manager
        assert manager is not None
        addresses = [WorkerId(agent.address) for agent in workers]
        await wait_for(
            lambda: [manager.state.worker(a) is not None for a in addresses],
            lambda known: all(known),
            what="every agent registered",
        )
        yield amm, workers


def held(workers: list[Agent]) -> int:
    return sum(len(agent.store) for agent in workers)


async def test_a_big_cycle_keeps_no_more_in_hand_than_the_window(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (amm, workers):
        manager = amm.manager
        assert manager is not None
        window = Window(manager)
        record = await manager.run_cycle(wait=True)
        assert (record.planned_count, record.applied) == (DROPS, DROPS)
        assert held(workers) == KEYS
        assert window.sends > DROPS // (AGENTS * FEED), "sent in slices"
        assert window.ahead == 0, "planned further while every agent had enough to do"


async def test_a_big_cycle_gives_the_c_heap_back_as_its_agents_catch_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time it has waited for its agents, what their answers freed goes back to the system
    (``malloc.trim``); a cycle with nothing to wait for trims nothing."""
    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    monkeypatch.setattr(malloc, "trim", trim)
    async with cluster(tmp_path) as (amm, workers):
        manager = amm.manager
        assert manager is not None
        window = Window(manager)
        record = await manager.run_cycle(wait=True)
        assert record.applied == DROPS
        assert held(workers) == KEYS
        assert window.sends > 2
        assert len(trims) >= window.sends - 2, "trimmed after each wait for the agents"
        trims.clear()
        await manager.run_cycle(wait=True)  # nothing left to do
        assert trims == []


async def test_a_silent_agent_does_not_stall_the_others(tmp_path: Path) -> None:
    """It keeps what it was sent; the others are sent theirs as they carry them out, and the
    cycle ends long before the directive timeout."""
    async with cluster(tmp_path, directive_timeout="60s") as (amm, workers):
        manager = amm.manager
        assert manager is not None
        window = Window(manager)
        speak = silence(workers[2])
        began = time.monotonic()
        record = await manager.run_cycle()
        assert time.monotonic() - began < 20.0
        assert record.planned_count == DROPS
        silent = WorkerId(workers[2].address)
        assert window.ahead == 0
        await wait_for(
            lambda: record.applied,
            lambda n: n == DROPS - manager._dispatcher.in_hand(silent),
            what="every drop but the silent agent's applied",
        )
        assert manager._dispatcher.in_hand(silent) > 0
        speak.set()
        await wait_for(lambda: record.applied, lambda n: n == DROPS, what="every drop applied")
        assert held(workers) == KEYS


async def test_a_cycle_whose_agents_all_stop_answering_still_ends(tmp_path: Path) -> None:
    """After the directive timeout it sends the rest without waiting for them."""
    async with cluster(tmp_path, directive_timeout="1s") as (amm, workers):
        manager = amm.manager
        assert manager is not None
        speaks = [silence(agent) for agent in workers]
        began = time.monotonic()
        record = await manager.run_cycle()
        assert 1.0 <= time.monotonic() - began < 15.0
        assert record.planned_count == DROPS
        assert len(manager.ledger) == DROPS, "the whole plan was sent once the wait timed out"
        for speak in speaks:
            speak.set()
        await wait_for(lambda: record.applied, lambda n: n == DROPS, what="every drop applied")


async def waiting(manager: ActiveMemoryManager) -> None:
    """Until a cycle waits for its agents (they all stopped answering): no more than the
    window is in flight."""
    watch = manager._dispatcher._watch
    await wait_for(lambda: watch.mark, lambda mark: mark == FEED, what="a cycle waiting")
    assert AGENTS * FEED <= len(manager.ledger) <= AGENTS * (FEED + FEED_STEP + core.STEP)


async def waiting_cycle(manager: ActiveMemoryManager) -> asyncio.Task[Any]:
    """A cycle, started, that waits for its silent agents (they have the window in hand)."""
    cycle = asyncio.create_task(manager.run_cycle())
    await waiting(manager)
    assert not cycle.done()
    return cycle


async def test_a_broken_stream_ends_the_wait(tmp_path: Path) -> None:
    """What the agent had is FAILED when its stream breaks: it has nothing in hand, and is sent
    more (on a new stream) at once."""
    async with cluster(tmp_path, directive_timeout="60s") as (amm, workers):
        manager = amm.manager
        assert manager is not None
        for agent in workers[1:]:
            silence(agent)
        silence(workers[0])
        began = time.monotonic()
        cycle = await waiting_cycle(manager)
        await workers[0].stop()
        record = await asyncio.wait_for(cycle, 20.0)
        assert time.monotonic() - began < 20.0
        assert record.planned_count == DROPS
        assert record.failed > 0


async def test_control_calls_and_the_cycle_lock_stay_answered_while_a_cycle_waits(
    tmp_path: Path,
) -> None:
    """Whoever asks for the cycle lock has the waiting cycle send the rest at once; a dry run
    sends nothing, so never waits; stopping the loop ends a waiting cycle at once."""
    async with cluster(tmp_path, directive_timeout="60s") as (amm, workers):
        manager = amm.manager
        assert manager is not None
        for agent in workers:
            silence(agent)
        cycle = await waiting_cycle(manager)
        began = time.monotonic()
        dry = await asyncio.wait_for(manager.run_cycle(dry_run=True), 20.0)
        assert time.monotonic() - began < 20.0
        assert cycle.done()
        assert len(manager.ledger) == DROPS
        assert dry.planned_count == 0, "everything is in flight"
        assert (await cycle).planned_count == DROPS


async def test_stopping_the_amm_ends_a_waiting_cycle(tmp_path: Path) -> None:
    async with cluster(tmp_path, directive_timeout="60s", interval="50ms") as (amm, workers):
        manager = amm.manager
        assert manager is not None
        for agent in workers:
            silence(agent)
        await manager.start()
        await waiting(manager)
        began = time.monotonic()
        await asyncio.wait_for(manager.stop(), 5.0)
        assert time.monotonic() - began < 5.0
        assert not manager.running
        assert len(manager.ledger) < DROPS, "the cycle stopped while it waited"
