"""The agent's life cycle: what it tells the AMM when registering, how it stops, how it behaves
when the AMM is slow or gone. A scripted AMM stands in only where the real one cannot be made
unresponsive; everything else runs against the real AMM."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from amm.base.checksum import checksum
from amm.v1 import agent_pb2, control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from tests.conftest import amm_config, free_port
from tests.support.agent import dial, poll, running_agent
from tests.support.faults import fake_amm
from tests.support.waiting import wait_for
from worker_agent import agent as agent_module


class ScriptedAmm(control_pb2_grpc.ActiveMemoryManagerServicer):
    """An AMM that registers agents but, with ``hang``, never answers UnregisterWorker or
    LookupKeys: the one behaviour of a stuck AMM that the real one cannot be made to show."""

    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.lookups = 0
        self._never = asyncio.Event()

    async def RegisterWorker(
        self, request: control_pb2.RegisterWorkerRequest, context: Any
    ) -> control_pb2.RegisterWorkerResponse:
        interval = Duration()
        interval.FromNanoseconds(100 * 10**9)
        return control_pb2.RegisterWorkerResponse(epoch=1, interval=interval)

    async def UnregisterWorker(
        self, request: control_pb2.UnregisterWorkerRequest, context: Any
    ) -> control_pb2.UnregisterWorkerResponse:
        if self.hang:
            await self._never.wait()
        return control_pb2.UnregisterWorkerResponse()

    async def LookupKeys(
        self, request: control_pb2.LookupKeysRequest, context: Any
    ) -> control_pb2.LookupKeysResponse:
        self.lookups += 1
        if self.hang:
            await self._never.wait()
        return control_pb2.LookupKeysResponse()


async def test_registration_tells_a_fresh_amm_the_epoch_to_move_past(tmp_path: Path) -> None:
    """A freshly started AMM learns from its agents which epoch it must move past. An agent
    nobody polls registers again (here: an AMM that does not poll while stopped)."""
    config = amm_config(tmp_path, interval="50ms", poll_while_stopped=False)
    async with (
        AmmServer(config) as amm,
        running_agent(amm=amm.address) as agent,
    ):
        await wait_for(lambda: agent.registered, what="registration")
        # Its AMM, before the state file was lost, had confirmed a newer epoch to it.
        seen = amm.epoch + 8
        agent.node.observe_epoch(seen)
        async with dial(agent.address) as stub:
            assert (await poll(stub)).epoch == seen
        # Not polled since: the agent registers again, telling the epoch it confirmed.
        await wait_for(lambda: amm.epoch, lambda e: e == seen + 1, what="the AMM moving past")
        await wait_for(lambda: agent.node.newest_epoch, lambda e: e == seen + 1, what="new epoch")


async def test_polls_from_a_superseded_amm_do_not_postpone_registering_again(
    tmp_path: Path,
) -> None:
    """The AMM forgot the agent; a superseded one (an older epoch) still polls it. Those
    polls must not keep the agent from registering again."""
    async with (
        AmmServer(amm_config(tmp_path, interval="50ms")) as amm,
        running_agent(amm=amm.address) as agent,
        dial(agent.address) as stub,
    ):
        superseded = amm.epoch - 1
        await wait_for(lambda: agent.registered, what="registration")
        assert amm.manager is not None
        await amm.manager.unregister(agent.address)

        async def stale_poll_then_listed() -> bool:
            await poll(stub, epoch=superseded)
            return amm.manager is not None and bool(amm.manager.state.worker_ids)

        await wait_for(stale_poll_then_listed, within=3, what="registering again")


async def test_a_put_finishing_while_the_agent_stops_is_refused_not_acknowledged() -> None:
    """The value would be lost at exit: the client must hear so and store it elsewhere."""
    async with running_agent() as agent, dial(agent.address) as stub:
        requests: asyncio.Queue[agent_pb2.PutRequest | None] = asyncio.Queue()
        header_sent = asyncio.Event()

        async def messages() -> AsyncIterator[agent_pb2.PutRequest]:
            header = agent_pb2.PutHeader(key="late", size=4, checksum=checksum(b"data"))
            yield agent_pb2.PutRequest(header=header)
            header_sent.set()  # asked for the next message: the header is written
            while (request := await requests.get()) is not None:
                yield request

        call = stub.Put(messages())
        await header_sent.wait()
        # Same connection, streams in order: once this is answered, the server has the Put.
        await poll(stub)
        stopping = asyncio.create_task(agent.stop())
        await wait_for(lambda: agent.node.closing, what="closing")
        requests.put_nowait(agent_pb2.PutRequest(chunk=b"data"))
        requests.put_nowait(None)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (err.value.details() or "")
        finally:
            await stopping
        assert "late" not in agent.store


async def test_failing_registration_keeps_warning_periodically(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the tenth failed attempt the agent went silent: an AMM down for hours left no trace
    in the agent's log."""
    caplog.set_level(logging.WARNING, logger="worker_agent.agent")
    config = {"register_backoff_max": 0.01, "register_warning_interval": 0.1}
    async with running_agent(amm=f"127.0.0.1:{free_port()}", **config):

        def warnings() -> int:
            return sum("cannot register" in r.getMessage() for r in caplog.records)

        await wait_for(warnings, lambda n: n >= 5, within=3, what="warnings beyond the tenth")
    assert "attempts" in caplog.records[-1].getMessage()


async def test_stop_waits_out_the_unregistration_and_the_grace_side_by_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an AMM that does not answer, unregistering (its deadline, 0.5 s here) and the grace
    for calls in flight (0.5 s) ran in turn."""
    monkeypatch.setattr(agent_module, "UNREGISTER_TIMEOUT", 0.5)
    amm = ScriptedAmm(hang=True)  # type: ignore[abstract]
    async with fake_amm(amm) as address, running_agent(amm=address) as agent:
        await wait_for(lambda: agent.registered, what="registration")
        async with dial(agent.address) as stub:
            # A Get of a key held nowhere asks the AMM who holds it, and waits: a call in flight.
            reader = stub.Get(agent_pb2.GetRequest(key="missing"))
            await wait_for(lambda: amm.lookups, what="LookupKeys asked")
            started = time.monotonic()
            await agent.stop()
            elapsed = time.monotonic() - started
            reader.cancel()
        assert elapsed < 0.8, f"took {elapsed:.2f}s to stop"
