"""Many workers unregistering at once, as when every agent of a cluster stops together: each
call is answered within an agent's deadline and the AMM lists none of them afterwards, with the
keys only they held recorded as lost, one for each.

Before, each removal made two passes over every key of the cluster, and one look at every key
changed since it began: with 1,000 agents holding 100k keys that was 15-30 s of the AMM's loop,
and most agents gave up and exited before their call was even taken in, leaving ghosts listed as
live (``benchmarks/bench_scale.py``). A real AMM on loopback; the workers are real grpc.aio
servers answering polls as agents would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from amm import AsyncClient
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.view import Key, WorkerId
from tests.conftest import amm_config
from tests.integration.test_unregister_pacing import _Holder
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for

#: Keys of the worker that stays: what every removal used to walk through, twice.
NKEYS = 60_000
#: Workers that leave together.
LEAVING = 300
#: Each leaving agent's deadline for its UnregisterWorker call (the agent's own is 5 s). Before,
#: 60-200 of them were not answered in time, and those not yet taken in were never removed,
#: on the project's 2-core VM under a load of 12; now all are, in 0.5-1.5 s.
DEADLINE = 3.0
#: Most CPU seconds the loop's thread (the AMM's, the test's and the fake agents') may spend from
#: the first call until every worker is gone: 2.6-3.0 s before, 0.3-0.35 s now under a load
#: of 7-12. CPU, not wall time: it does not grow with other processes' load, so it fails the
#: old code on an idle machine too, where its calls may all beat the deadline.
CPU_MOST = 1.2
SHARED = Key("shared")


class _Small(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls as each of many small agents would, one per port of one server: the AMM's
    poll names the incarnation it registered (``i-<n>``), and that agent holds ``own-<n>`` and
    the key all of them share."""

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        incarnation = request.incarnation
        answer = agent_pb2.PollResponse(
            incarnation=incarnation, version=1, status=types_pb2.WORKER_STATUS_RUNNING
        )
        if request.since_version != 1:
            answer.full = True
            for key in (f"own-{incarnation}", SHARED):
                answer.keys.append(types_pb2.KeyInfo(key=key, size=8, checksum=key))
        return answer


@contextlib.asynccontextmanager
async def _small_agents(count: int) -> AsyncIterator[list[str]]:
    """``count`` addresses served by ``_Small``: one server, a port each."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_WorkerAgentServicer_to_server(_Small(), server)  # type: ignore[abstract]
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(count)]
    await server.start()
    try:
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        await server.stop(None)


async def test_many_workers_unregistering_at_once_are_all_removed_in_time(
    tmp_path: Path,
) -> None:
    keys = [types_pb2.KeyInfo(key=f"k{i:06d}", size=8, checksum="c") for i in range(NKEYS)]
    async with (
        AmmServer(amm_config(tmp_path, interval="1h", state_path=":memory:")) as amm,
        AsyncClient(amm.address, timeout=30) as client,
        fake_peer(_Holder(keys)) as keeper,  # type: ignore[abstract]
        _small_agents(LEAVING) as small,
    ):
        assert amm.manager is not None
        state = amm.manager.state
        stub = client._amm_stub()
        await stub.RegisterWorker(
            control_pb2.RegisterWorkerRequest(address=keeper, incarnation="i1")
        )
        await asyncio.gather(
            *(
                stub.RegisterWorker(
                    control_pb2.RegisterWorkerRequest(address=address, incarnation=f"i-{n}")
                )
                for n, address in enumerate(small)
            )
        )
        await wait_for(
            lambda: (
                state.nkeys == NKEYS + LEAVING + 1 and len(state.keys[SHARED].holders) == LEAVING
            ),
            within=60,
            what="every worker's keys merged",
        )

        started, cpu = time.monotonic(), time.thread_time()
        replies = await asyncio.gather(
            *(
                stub.UnregisterWorker(
                    control_pb2.UnregisterWorkerRequest(address=address), timeout=DEADLINE
                )
                for address in small
            ),
            return_exceptions=True,
        )
        took = time.monotonic() - started

        failed = [r for r in replies if not isinstance(r, control_pb2.UnregisterWorkerResponse)]
        assert not failed, f"{len(failed)} of {LEAVING} calls failed ({failed[0]}) in {took:.1f} s"
        assert all(r.removed for r in replies)  # type: ignore[union-attr]
        await wait_for(
            lambda: state.worker_ids == [WorkerId(keeper)],
            within=DEADLINE,
            what="only the worker that stayed listed",
        )
        spent = time.thread_time() - cpu
        assert spent < CPU_MOST, f"the AMM's loop spent {spent:.2f} s of CPU on {LEAVING} removals"
        # Each took its own key with it; the shared one went with the last of them.
        lost = sorted(k for r in replies for k in r.lost_keys)  # type: ignore[union-attr]
        assert lost == sorted([f"own-i-{n}" for n in range(LEAVING)] + [SHARED])
        assert amm.manager.lost_keys == LEAVING + 1
        assert state.nkeys == NKEYS
        assert state.keys[Key("k012345")].holders == {keeper}
