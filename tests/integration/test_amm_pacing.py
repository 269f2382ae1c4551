"""The AMM answers control calls within about one budget of bulk work while bulk work runs in its
loop (as a big cycle's polls merged, drops planned and sent, outcomes judged, each paced by
``pacing.Budget``), over real gRPC.

Responsiveness is judged by the CPU the loop's thread spends while a call is in flight, not by
wall time: a loaded machine stretches wall time, not the CPU a step takes.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import grpc

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from amm_service.runtime.loop.pacing import Budget
from tests.conftest import amm_config
from tests.support.pacing import call_cpu

#: Most CPU seconds of the loop's thread while one control call is in flight, for 4 calls in 5:
#: about one budget of bulk work (``pacing.BUDGET``, 5 ms) and the call's own steps: 5-6 ms (four
#: runs). Paced within each turn of the loop (the former ``amm.base.turns``), the loop ran a
#: budget of bulk work in every turn, and a call, which takes several turns, waited as many
#: budgets: 32-51 ms.
MAX_CALL_CPU = 0.012


async def test_control_calls_wait_for_one_budget_of_bulk_work_not_one_per_turn(
    tmp_path: Path,
) -> None:
    """A unary call takes several turns of the AMM's loop to be answered (its arrival, its
    request read, its handler, its reply; each handed over by gRPC's poller thread). Bulk loops
    paced within each turn ran a budget of work before every step; paced in shifts
    (``amm.base.shifts``), their pause lets the call's steps follow one another. The cyclic GC is
    paused meanwhile: a full collection over this process's objects is not the pacing's doing."""
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        await control.Running(control_pb2.RunningRequest())  # connected

        async def call(i: int) -> None:
            if i % 2:
                await control.GetStatus(control_pb2.GetStatusRequest())
            else:
                await control.Running(control_pb2.RunningRequest())

        spent = await call_cpu(call, Budget)
        most = statistics.quantiles(spent, n=5)[-1]
        assert most < MAX_CALL_CPU, f"4 calls in 5 waited up to {most * 1000:.1f} ms of CPU"
