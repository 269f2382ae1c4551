"""A worker leaving with 100k keys does not hold the AMM's event loop: control calls are answered
while its keys' records are worked out (before: 0.15-0.7 s with every call waiting). A real AMM;
the workers are real grpc.aio servers answering polls as agents holding 100k keys would."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amm import AsyncClient
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.view import ClusterState, Key, WorkerId
from tests.conftest import amm_config
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for

NKEYS = 100_000
#: Most CPU seconds the loop's thread may spend between two 1 ms sleeps of a probe while the
#: worker leaves: 0.2-0.3 s before, 0.05-0.07 s now on the project's 2-core VM under load (the
#: records taken in at once, and the lost keys looked for). CPU, not wall time: on a loaded
#: machine a slice's wall time is mostly other processes'.
MOST = 0.15


class _Holder(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls as an agent holding ``keys`` (sorted) would: a full snapshot in pages,
    then nothing new."""

    def __init__(self, keys: list[types_pb2.KeyInfo]) -> None:
        self.keys = keys
        self.names = [k.key for k in keys]
        self.incarnation = "i1"
        self.polls = 0

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        self.polls += 1
        answer = agent_pb2.PollResponse(
            incarnation=self.incarnation, version=1, status=types_pb2.WORKER_STATUS_RUNNING
        )
        if (
            request.incarnation == self.incarnation
            and request.since_version == 1
            and not request.cursor
        ):
            return answer
        start = bisect.bisect_right(self.names, request.cursor) if request.cursor else 0
        page = self.keys[start : start + (request.max_keys or 10_000)]
        answer.full = not request.cursor
        answer.keys.extend(page)
        if start + len(page) < len(self.keys):
            answer.next_cursor = page[-1].key
        return answer


def _keys() -> list[types_pb2.KeyInfo]:
    return [types_pb2.KeyInfo(key=f"k{i:06d}", size=8, checksum="c") for i in range(NKEYS)]


@contextlib.asynccontextmanager
async def _two_holders(
    tmp_path: Path, leaving: _Holder
) -> AsyncIterator[tuple[control_pb2_grpc.ActiveMemoryManagerAsyncStub, ClusterState, str, str]]:
    """A real AMM with two workers registered that hold the same 100k keys, merged: the stub,
    the AMM's state, the leaver's address (answered by ``leaving``) and the keeper's."""
    async with (
        AmmServer(amm_config(tmp_path, interval="1h")) as amm,
        AsyncClient(amm.address, timeout=10) as client,
        fake_peer(leaving) as leaver,
        fake_peer(_Holder(leaving.keys)) as keeper,  # type: ignore[abstract]
    ):
        stub = client._amm_stub()
        for address in (leaver, keeper):
            await stub.RegisterWorker(
                control_pb2.RegisterWorkerRequest(address=address, incarnation="i1")
            )
        assert amm.manager is not None
        state = amm.manager.state
        await wait_for(
            lambda: all(len(state.held_by(WorkerId(w))) == NKEYS for w in (leaver, keeper)),
            within=60,
            what="both workers' 100k keys merged",
        )
        yield stub, state, leaver, keeper


class _Held:
    """The most CPU time the loop's thread spent between two of its turns while it runs."""

    def __init__(self) -> None:
        self.most = 0.0
        self.turns = 0

    async def watch(self) -> None:
        while True:
            before = time.thread_time()
            await asyncio.sleep(0.001)  # whatever else the loop runs meanwhile, on its thread
            self.most = max(self.most, time.thread_time() - before)
            self.turns += 1


async def test_the_loop_stays_responsive_while_a_100k_key_worker_unregisters(
    tmp_path: Path,
) -> None:
    leaving = _Holder(_keys())  # type: ignore[abstract]
    async with _two_holders(tmp_path, leaving) as (stub, state, leaver, keeper):
        held = _Held()
        watching = asyncio.create_task(held.watch())
        answered: list[float] = []

        async def ask() -> None:
            while True:
                before = time.perf_counter()
                await stub.GetMembership(control_pb2.GetMembershipRequest())
                answered.append(time.perf_counter() - before)

        asking = asyncio.create_task(ask())
        try:
            await wait_for(lambda: held.turns > 10 and answered, what="probes running")
            held.most = 0.0
            answered.clear()
            reply = await stub.UnregisterWorker(control_pb2.UnregisterWorkerRequest(address=leaver))
        finally:
            watching.cancel()
            asking.cancel()
        assert (reply.removed, reply.lost_key_count) == (True, 0)
        kv = state.keys[Key("k054321")]
        assert kv.holders == {keeper}
        assert len(state.held_by(WorkerId(keeper))) == state.nkeys == NKEYS
        assert state.worker(WorkerId(leaver)) is None
        assert len(answered) > 3, "control calls were answered meanwhile"
        assert held.most < MOST, f"the loop was held {held.most * 1000:.0f} ms at once"


@pytest.mark.parametrize("incarnation", ["i1", "i2"], ids=["same-process", "new-process"])
async def test_a_worker_that_registers_while_it_is_removed_stays_registered(
    tmp_path: Path, incarnation: str
) -> None:
    """The removal works out its records in steps; a registration of the same worker that
    arrives meanwhile (its agent registering again, or restarted) comes after it: the worker
    ends registered, holding what it reports (before, a registration of the same process was
    taken out by the removal a moment after it was made)."""
    leaving = _Holder(_keys())  # type: ignore[abstract]
    async with _two_holders(tmp_path, leaving) as (stub, state, leaver, keeper):
        polls = leaving.polls
        unregistering = asyncio.ensure_future(
            stub.UnregisterWorker(control_pb2.UnregisterWorkerRequest(address=leaver))
        )
        # The unregistering agent is polled once more, then its 100k records are worked out.
        await wait_for(lambda: leaving.polls > polls, what="the last poll of the old process")
        leaving.incarnation = incarnation
        await stub.RegisterWorker(
            control_pb2.RegisterWorkerRequest(address=leaver, incarnation=incarnation)
        )
        reply = await unregistering
        assert reply.removed
        worker = state.worker(WorkerId(leaver))
        assert worker is not None, "the registration was taken out by the removal"
        assert worker.incarnation == incarnation
        await wait_for(
            lambda: len(state.held_by(WorkerId(leaver))) == NKEYS,
            within=60,
            what="the new process's keys merged",
        )
        assert state.keys[Key("k054321")].holders == {leaver, keeper}
