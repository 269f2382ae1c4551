"""Agents and the real AMM: registration, retry, re-registration after an AMM restart, WhoHas-driven
Get and unregistration. Both sides run in this process on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from amm_service.runtime.records.state import StateStore
from tests.conftest import amm_config, free_port
from tests.support.agent import agents, dial, get, poll, put, running_agent
from tests.support.faults import fake_amm, fake_peer
from tests.support.waiting import wait_for

DATA = b"payload" * 100


async def listed(amm: AmmServer) -> list[tuple[str, str]]:
    """The workers the AMM lists, as (address, name)."""
    async with grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel:
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        resp = await stub.ListWorkers(control_pb2.ListWorkersRequest())
    return [(w.address, w.name) for w in resp.workers]


async def test_registers_learns_the_epoch_and_unregisters_on_stop(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm:
        async with running_agent(amm=amm.address, name="w1") as agent, dial(agent.address) as stub:
            await wait_for(lambda: listed(amm), lambda ws: ws == [(agent.address, "w1")])
            # Listed from the start of its registration, which answers once the AMM polled it.
            await wait_for(lambda: agent.registered, what="the registration's answer")
            assert (await poll(stub)).epoch == amm.epoch
            address = agent.address
        assert (address, "w1") not in await listed(amm)


async def test_registration_retries_until_the_amm_is_up(tmp_path: Path) -> None:
    port = free_port()
    async with running_agent(amm=f"127.0.0.1:{port}", register_backoff_max=0.2) as agent:
        assert not agent.registered
        async with AmmServer(amm_config(tmp_path, listen=f"127.0.0.1:{port}")) as amm:
            await wait_for(lambda: agent.registered, what="registration after the AMM came up")
            assert [a for a, _ in await listed(amm)] == [agent.address]


class _BusyAmm(control_pb2_grpc.ActiveMemoryManagerServicer):
    """Answers RegisterWorker after ``delay`` seconds, as an AMM does the last of a thousand
    agents that join at once; counts the attempts."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.attempts = 0

    async def RegisterWorker(
        self, request: control_pb2.RegisterWorkerRequest, context: Any
    ) -> control_pb2.RegisterWorkerResponse:
        self.attempts += 1
        await asyncio.sleep(self.delay)
        interval = Duration()
        interval.FromNanoseconds(100 * 10**9)
        return control_pb2.RegisterWorkerResponse(epoch=1, interval=interval)

    async def UnregisterWorker(
        self, request: control_pb2.UnregisterWorkerRequest, context: Any
    ) -> control_pb2.UnregisterWorkerResponse:
        return control_pb2.UnregisterWorkerResponse()


async def test_a_busy_amm_registers_the_agent_at_the_first_attempt() -> None:
    """The AMM answers after 1.3 s: with a deadline of about a second (what the agent had with
    a short backoff), every attempt timed out and the agent never registered."""
    amm = _BusyAmm(delay=1.3)  # type: ignore[abstract]
    async with (
        fake_amm(amm) as address,
        running_agent(amm=address, register_backoff_max=0.2) as agent,
    ):
        await wait_for(lambda: agent.registered, within=5.0, what="registration")
        assert amm.attempts == 1


async def test_an_amm_that_restarted_and_forgot_the_agent_gets_it_back(tmp_path: Path) -> None:
    port = free_port()
    config = amm_config(tmp_path, listen=f"127.0.0.1:{port}", interval="100ms")
    async with AmmServer(config) as amm, running_agent(amm=amm.address) as agent:
        await wait_for(lambda: agent.registered, what="first registration")
        await amm.stop()
        forgetful = amm_config(
            tmp_path / "other", listen=f"127.0.0.1:{port}", interval="100ms"
        )  # a new state file: the new AMM knows no workers
        async with AmmServer(forgetful) as again:
            # Read at once, not over a call: under load the agent registered before a
            # ListWorkers came back (it registers again 0.3 s after the last poll).
            assert again.manager is not None
            assert again.manager.state.workers == []
            await wait_for(lambda: listed(again), lambda ws: len(ws) == 1, what="re-registration")


async def test_get_asks_the_amm_who_holds_a_missing_key(tmp_path: Path) -> None:
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        agents(2, amm=amm.address) as [(_, stub_a), (_, stub_b)],
    ):
        await wait_for(lambda: listed(amm), lambda ws: len(ws) == 2, what="registrations")
        await put(stub_a, "k", DATA)
        header, data = await get(stub_b, "k")
        assert data == DATA
        assert header.replicated
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(stub_b, "nobody-has-it")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_restarted_amm_takes_back_live_workers_and_ghosts_die(tmp_path: Path) -> None:
    port = free_port()
    # A long interval: the agent would not re-register by itself for 30 s.
    config = amm_config(
        tmp_path,
        listen=f"127.0.0.1:{port}",
        interval="10s",
        stale_after="100ms",
        dead_after="300ms",
        startup_grace="10s",
    )
    ghost = f"127.0.0.1:{free_port()}"
    async with running_agent(amm=f"127.0.0.1:{port}") as agent:
        async with AmmServer(config) as amm:
            await wait_for(lambda: agent.registered, what="registration")
        with StateStore(config.state_path) as store:
            store.remember_worker(ghost, "ghost")
        async with AmmServer(config) as amm:
            manager = amm.manager
            assert manager is not None
            # The ghost is kept (unreported) and holds drops back until the liveness rules
            # declare it dead.
            assert sorted(await listed(amm)) == sorted(
                [(agent.address, agent.address), (ghost, "ghost")]
            )
            assert manager.in_startup_grace()

            async def cycle_then_list() -> list[tuple[str, str]]:
                await manager.run_cycle()
                return await listed(amm)

            await wait_for(
                cycle_then_list, lambda ws: ws == [(agent.address, agent.address)], what="death"
            )
            assert [e.worker for e in manager.events.of_kind("worker-dead")] == [ghost]
            assert not manager.in_startup_grace()
        with StateStore(config.state_path) as store:
            assert [w.address for w in store.known_workers()] == [agent.address]


async def test_auto_advertises_the_ip_on_the_route_to_the_amm(tmp_path: Path) -> None:
    """How replicated containers register (docker-compose.yml): listen on the wildcard address,
    advertise ``auto``; the AMM lists, and dials, an IP address with the bound port. (In
    plaintext, which a wildcard address allows only when told: compose runs it with TLS.)"""
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        running_agent(
            amm=amm.address, listen="0.0.0.0:0", advertise="auto", insecure=True
        ) as agent,
    ):
        await wait_for(lambda: agent.registered, what="registration")
        port = agent.address.rpartition(":")[2]
        assert agent.address == f"127.0.0.1:{port}"
        assert await listed(amm) == [(agent.address, agent.address)]
        async with dial(agent.address) as stub:
            assert (await poll(stub)).epoch == amm.epoch


class _SlowPollAgent(agent_pb2_grpc.WorkerAgentServicer):
    """An agent that answers polls ``delay`` seconds late (0 at first), holding nothing: as
    each of many agents stopping at once is answered by an AMM polling them all."""

    def __init__(self) -> None:
        self.delay = 0.0

    async def Poll(self, request: agent_pb2.PollRequest, context: Any) -> agent_pb2.PollResponse:
        await asyncio.sleep(self.delay)
        return agent_pb2.PollResponse(incarnation="slow-1", version=1, full=True)


async def test_an_unregistration_the_caller_stops_waiting_for_still_removes_the_worker(
    tmp_path: Path,
) -> None:
    """The AMM polls a leaving worker once more before removing it; when that took longer than
    the caller's deadline, the removal was given up with the call, and the worker stayed listed
    as live until declared dead (hundreds of them when many agents stopped at once)."""
    agent = _SlowPollAgent()  # type: ignore[abstract]
    async with (
        AmmServer(amm_config(tmp_path, interval="10s", poll_timeout="3s")) as amm,
        fake_peer(agent) as address,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        await stub.RegisterWorker(
            control_pb2.RegisterWorkerRequest(address=address, name="slow", incarnation="slow-1")
        )
        assert await listed(amm) == [(address, "slow")]
        agent.delay = 1.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=address), timeout=0.2
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: listed(amm), lambda ws: ws == [], within=5, what="the removal")
        again = await stub.UnregisterWorker(control_pb2.UnregisterWorkerRequest(address=address))
        assert not again.removed


class _SlowToUnregisterAmm(_BusyAmm):
    """Registers at once; answers UnregisterWorker after ``delay`` seconds and notes who it
    unregistered then (a call cancelled meanwhile notes nothing)."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=0.0)
        self.unregister_delay = delay
        self.unregistered: list[str] = []

    async def UnregisterWorker(
        self, request: control_pb2.UnregisterWorkerRequest, context: Any
    ) -> control_pb2.UnregisterWorkerResponse:
        await asyncio.sleep(self.unregister_delay)
        self.unregistered.append(request.address)
        return control_pb2.UnregisterWorkerResponse(removed=True)


async def test_a_stopping_agent_waits_for_an_amm_that_answers_its_unregistration_late() -> None:
    """Many agents stopping at once are answered seconds late; with 0.5 s the agent gave up
    (and cancelled the call) and the AMM kept listing it as live."""
    amm = _SlowToUnregisterAmm(delay=1.5)  # type: ignore[abstract]
    async with fake_amm(amm) as address:
        async with running_agent(amm=address) as agent:
            await wait_for(lambda: agent.registered, what="registration")
        assert amm.unregistered == [agent.address]
