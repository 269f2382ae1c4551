"""A worker that registers again (a new incarnation) while the AMM is polling it: the AMM closes
its channel to the old process, which cancels the poll under way. Neither a fresh query nor a
cycle may be left hanging or aborted by that. A real AMM and a real grpc.aio server playing the
agent, whose first poll hangs until the test lets it go."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for


class _SlowFirstPoll(agent_pb2_grpc.WorkerAgentServicer):
    """Its first poll hangs until ``release`` is set; later polls answer at once."""

    def __init__(self) -> None:
        self.polls = 0
        self.hanging = asyncio.Event()
        self.release = asyncio.Event()

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        self.polls += 1
        if self.polls == 1:
            self.hanging.set()
            await self.release.wait()
        return agent_pb2.PollResponse(
            incarnation=request.incarnation or "new",
            version=1,
            full=True,
            status=types_pb2.WORKER_STATUS_RUNNING,
        )


async def test_a_fresh_query_answers_when_its_worker_registers_again_meanwhile(
    tmp_path: Path,
) -> None:
    """Before: closing the old channel cancelled the poll, the cancellation escaped the WhoHas
    handler and the caller got no answer until its own deadline."""
    async with (
        AmmServer(amm_config(tmp_path, poll_timeout="30s")) as amm,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        assert amm.manager is not None
        host = _SlowFirstPoll()  # type: ignore[abstract]
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        async with fake_peer(host) as address:
            await control.RegisterWorker(
                control_pb2.RegisterWorkerRequest(address=address, incarnation="old")
            )
            query = asyncio.ensure_future(
                control.WhoHas(control_pb2.WhoHasRequest(fresh=True), timeout=10)
            )
            await asyncio.wait_for(host.hanging.wait(), 5)
            await control.RegisterWorker(
                control_pb2.RegisterWorkerRequest(address=address, incarnation="new")
            )
            answer = await asyncio.wait_for(query, 3)
            host.release.set()
        assert list(answer.entries) == []


async def test_a_cycle_goes_on_when_a_worker_registers_again_while_it_is_polled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the cancelled poll aborted the whole cycle with an ERROR and a traceback."""
    caplog.set_level(logging.INFO, logger="amm_service")
    async with AmmServer(amm_config(tmp_path, poll_timeout="30s")) as amm:
        manager = amm.manager
        assert manager is not None
        host = _SlowFirstPoll()  # type: ignore[abstract]
        async with fake_peer(host) as address:
            await manager.register(address, "w", "old")
            cycle = asyncio.ensure_future(manager.run_cycle())
            await asyncio.wait_for(host.hanging.wait(), 5)
            await manager.register(address, "w", "new")
            record = await asyncio.wait_for(cycle, 3)
            host.release.set()
            assert record.unreachable == ()
            # The loop too: a cycle whose poll is cut short this way is not an error.
            host.polls = 0
            host.hanging.clear()
            host.release.clear()
            await manager.start()
            await asyncio.wait_for(host.hanging.wait(), 5)
            before = manager.cycles
            await manager.register(address, "w", "newer")
            await wait_for(lambda: manager.cycles > before + 1, what="the next cycles")
            host.release.set()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
