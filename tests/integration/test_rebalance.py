"""Rebalance steering real agents on loopback: keys put on one worker end spread within the gap,
moved by replicate-then-drop, with nothing lost."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import agents, fetch, put
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from amm.v1.agent_pb2_grpc import WorkerAgentAsyncStub
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub

KiB = 1024
MiB = 1024 * KiB
SIZE = 256 * KiB
LIMIT = 16 * MiB
GAP = 0.10 * LIMIT


@asynccontextmanager
async def rebalancing_cluster(
    tmp_path: Path, n: int, limit: int = LIMIT, **amm_overrides: object
) -> AsyncIterator[tuple[ActiveMemoryManagerAsyncStub, list[str], list[WorkerAgentAsyncStub]]]:
    """An AMM running ReduceReplicas and Rebalance on managed memory, and ``n`` agents."""
    policies = [{"class": "ReduceReplicas"}, {"class": "Rebalance"}]
    config = amm_config(tmp_path, measure="managed", policies=policies, **amm_overrides)
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(AmmServer(config))
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS)
        )
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        # The limit bounds managed memory; these agents share the test process, whose RSS would
        # pause them at the default pause fraction.
        workers = await stack.enter_async_context(
            agents(n, amm=amm.address, memory_limit=limit, pause_fraction=None)
        )

        async def registered() -> int:
            return len((await control.ListWorkers(control_pb2.ListWorkersRequest())).workers)

        await wait_for(registered, lambda count: count == n, what="agents registered")
        yield control, [a.address for a, _ in workers], [s for _, s in workers]


async def test_keys_put_on_one_worker_end_spread_within_the_gap(tmp_path: Path) -> None:
    values = {f"k{i:02}": random.Random(i).randbytes(SIZE) for i in range(40)}  # 10 MiB
    async with rebalancing_cluster(tmp_path, 4) as (control, addresses, stubs):
        for key, value in values.items():
            await put(stubs[0], key, value)

        async def managed() -> dict[str, int]:
            resp = await control.ListWorkers(control_pb2.ListWorkersRequest(fresh=True))
            return {w.address: w.memory.managed_bytes for w in resp.workers}

        assert await managed() == {addresses[0]: 40 * SIZE, **dict.fromkeys(addresses[1:], 0)}
        cycles: list[types_pb2.CycleReport] = []
        while not cycles or cycles[-1].directives_sent:
            assert len(cycles) < 6, f"still moving after {len(cycles)} cycles"
            resp = await control.RunOnce(control_pb2.RunOnceRequest(wait=True))
            cycles.append(resp.cycle)
        memory = await managed()
        assert max(memory.values()) - min(memory.values()) <= GAP
        assert all(c.refused == 0 and c.failed == 0 for c in cycles)
        ops = [(d.directive.op, d.policy) for c in cycles for d in c.directives]
        moves = ops.count((types_pb2.DIRECTIVE_OP_REPLICATE, "Rebalance"))
        assert moves == sum(memory.values()) // SIZE - memory[addresses[0]] // SIZE
        assert (
            ops.count((types_pb2.DIRECTIVE_OP_DROP, "ReduceReplicas"))
            + ops.count((types_pb2.DIRECTIVE_OP_DROP, "Rebalance"))
            == moves
        )
        # Nothing lost: one copy of every key, each read back intact from its holder.
        found = await control.WhoHas(control_pb2.WhoHasRequest(fresh=True))
        holders = {e.key: list(e.workers) for e in found.entries}
        assert sorted(holders) == sorted(values)
        assert all(len(ws) == 1 for ws in holders.values())
        for key, value in values.items():
            stub = stubs[addresses.index(holders[key][0])]
            _, data = await fetch(stub, key, checksum(value))
            assert checksum(data) == checksum(value)


async def test_a_dry_run_leaves_rebalance_as_it_was(tmp_path: Path) -> None:
    """A dry run plans on copies of the policies: Rebalance, which remembers its senders across
    cycles, must not forget one because a dry run planned moves that were never sent.

    Limits of 1,000,000 bytes: the sender starts at 320,000 (above sender_min, 300,000) against
    a mean of 160,000; one move per cycle (one incoming transfer) takes it to 220,000, still
    above the band (mean + 50,000) but below sender_min: only being a sender already keeps it
    one. The dry run plans the move that would end its sending; the real cycle must too."""
    limit = 1_000_000
    values = {"big": b"b" * 100_000, **{f"s{i:02}": bytes([i]) * 20_000 for i in range(11)}}
    async with rebalancing_cluster(tmp_path, 2, limit, max_incoming_transfers=1) as (
        control,
        addresses,
        stubs,
    ):
        sender, recipient = addresses
        for key, value in values.items():
            await put(stubs[0], key, value)

        async def run_once(dry_run: bool) -> set[tuple[int, str, str]]:
            request = control_pb2.RunOnceRequest(wait=True, dry_run=dry_run)
            cycle = (await control.RunOnce(request)).cycle
            return {(d.directive.op, d.directive.key, d.worker) for d in cycle.directives}

        replicate = types_pb2.DIRECTIVE_OP_REPLICATE
        assert await run_once(dry_run=False) == {(replicate, "big", recipient)}
        planned = await run_once(dry_run=True)
        assert (types_pb2.DIRECTIVE_OP_DROP, "big", sender) in planned
        assert [w for op, _, w in planned if op == replicate] == [recipient], "one more move"
        assert await run_once(dry_run=False) == planned
