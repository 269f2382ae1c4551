"""What happens to data when an agent process is stopped, with real AMM and agent processes:
SIGTERM (``docker stop``, a scale-down) drains it first, SIGINT stops it at once, SIGKILL and a
restart on the same address lose what only it held; nothing is lost in silence. The last tests
drive ``Agent.drain`` in this process, to look at a draining agent from outside."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from amm import AsyncClient, Client, LostKey
from amm.cluster import AGENT_MODULE, AGENT_READY, LocalProcess
from amm.v1 import control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from amm_service.decisions.view import WorkerId
from tests.conftest import amm_config, free_port
from tests.support.agent import dial, get, put, running_agent
from tests.support.faults import fake_amm
from tests.support.processes import local_cluster
from tests.support.waiting import poll_until, wait_for

DATA = b"d" * 10_000


def kinds(client: Client) -> list[str]:
    return [e.kind for e in client.status().recent_events]


def test_sigterm_copies_what_only_the_agent_holds_elsewhere_then_it_exits_0() -> None:
    """Before: SIGTERM unregistered the agent and the keys only it held were gone, with no
    key-lost event, lost_keys 0 and who-has answering NOT_FOUND."""
    with local_cluster(3) as cluster, Client(cluster.address, timeout=10) as client:
        w1, w2, w3 = client.has_what()
        client.put("solo", DATA, workers=[w2])
        client.put("shared", DATA, workers=[w1, w2])
        client.who_has()
        started = time.monotonic()
        assert cluster.stop_worker(w2, signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        holders = client.who_has()
        assert set(holders) == {"solo", "shared"}
        assert w2 not in {w for ws in holders.values() for w in ws}
        assert client.get("solo") == DATA
        status = client.status()
        assert status.totals.lost_keys == 0
        assert client.lost_keys() == []
        events = [(e.kind, e.worker) for e in status.recent_events]
        assert ("retired", w2) in events
        assert "key-lost" not in kinds(client)
        assert [w.address for w in client.workers()] == [w1, w3]


def test_sigterm_with_nowhere_to_copy_to_says_which_keys_it_loses_and_they_are_recorded() -> None:
    out = io.StringIO()
    with local_cluster(1, echo=out) as cluster, Client(cluster.address, timeout=10) as client:
        (w1,) = client.has_what()
        client.put("doomed", DATA, workers=[w1])
        assert cluster.stop_worker(w1, signal.SIGTERM) == 0
        logged = out.getvalue()
        assert "could not drain" in logged
        assert "1 key(s) held only here are lost when it exits: 'doomed'" in logged
        (lost,) = client.lost_keys()
        assert (lost.key, lost.worker) == ("doomed", w1)
        assert f"{w1} unregistered" in lost.reason
        assert "key-lost" in kinds(client)


def test_sigint_stops_at_once_and_what_only_it_held_is_recorded_lost() -> None:
    with local_cluster(2) as cluster, Client(cluster.address, timeout=10) as client:
        _, w2 = client.has_what()
        client.put("gone", DATA, workers=[w2])
        assert cluster.stop_worker(w2, signal.SIGINT) == 0
        assert [k.key for k in client.lost_keys()] == ["gone"]
        assert client.who_has() == {}


def test_an_agent_killed_and_restarted_on_its_address_before_dead_after_is_on_the_record() -> None:
    """Before: the new process registered again long before dead-after, and the keys only the
    old one held vanished in silence."""
    with (
        local_cluster(2, service_args=["--dead-after", "60s"]) as cluster,
        Client(cluster.address, timeout=10) as client,
    ):
        w1, w2 = client.has_what()
        client.put("solo", DATA, workers=[w2])
        client.put("shared", DATA, workers=[w1, w2])
        client.who_has()
        cluster.stop_worker(w2, signal.SIGKILL)
        argv = [sys.executable, "-m", AGENT_MODULE, "--amm", cluster.address, "--listen", w2]
        again = LocalProcess("worker-again", argv, AGENT_READY, dict(os.environ), None)
        try:
            assert again.wait_ready(time.monotonic() + 30) == w2

            def polled_then_lost() -> list[LostKey]:
                client.has_what()  # judged once the new process answered a poll: it might
                return client.lost_keys()  # have had solo back

            (lost,) = poll_until(polled_then_lost, what="the lost key recorded")
            assert lost.key == "solo"
            assert f"{w2} restarted" in lost.reason
            assert client.who_has() == {"shared": (w1,)}
        finally:
            again.kill()


async def test_a_draining_agent_serves_but_takes_nothing_new_and_the_call_is_validated(
    tmp_path: Path,
) -> None:
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        running_agent(amm=amm.address) as leaving,
        running_agent(amm=amm.address) as staying,
        AsyncClient(amm.address, timeout=10) as client,
        dial(leaving.address) as stub,
    ):
        await wait_for(lambda: leaving.registered and staying.registered, what="registered")
        await put(stub, "solo", DATA)
        await client.pin("solo", leaving.address)  # a reader: its copy stays until unpinned
        assert await leaving.drain(grace=10)  # a copy elsewhere is enough
        holders = (await client.who_has("solo"))["solo"]
        assert set(holders) == {leaving.address, staying.address}
        header, value = await get(stub, "solo")  # it still serves what it holds
        assert (header.key, value) == ("solo", DATA)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(stub, "late", DATA)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        (worker,) = [w for w in await client.workers() if w.address == leaving.address]
        assert worker.status == "retired"
        control = client._amm_stub()
        bad = [
            (control_pb2.DrainWorkerRequest(), grpc.StatusCode.INVALID_ARGUMENT),
            (control_pb2.DrainWorkerRequest(address="h:1"), grpc.StatusCode.NOT_FOUND),
            (
                control_pb2.DrainWorkerRequest(
                    address=staying.address, timeout=Duration(seconds=-1)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]
        for request, code in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await control.DrainWorker(request)
            assert err.value.code() == code
        await leaving.stop()
        assert await client.lost_keys() == []


async def test_without_retire_worker_an_agent_cannot_drain_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker_agent.agent")
    config = amm_config(tmp_path, policies=[{"class": "ReduceReplicas"}])
    async with (
        AmmServer(config) as amm,
        running_agent(amm=amm.address) as agent,
        AsyncClient(amm.address, timeout=10) as client,
    ):
        await wait_for(lambda: agent.registered, what="registered")
        async with dial(agent.address) as stub:
            await put(stub, "solo", DATA)
        assert not await agent.drain(grace=5)
        await agent.stop()
        assert [k.key for k in await client.lost_keys()] == ["solo"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("could not drain (FAILED_PRECONDITION") for m in messages)


class _RestartingAmm(control_pb2_grpc.ActiveMemoryManagerServicer):
    """An AMM that refuses registrations (UNAVAILABLE, as while it restarts) until ``refusals``
    of them, and is up from the last one on; it knows no key and drains whatever it is asked."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.attempts = 0
        self.up = asyncio.Event()
        self.drained: list[str] = []

    async def RegisterWorker(
        self, request: control_pb2.RegisterWorkerRequest, context: Any
    ) -> control_pb2.RegisterWorkerResponse:
        self.attempts += 1
        if self.attempts <= self.refusals:
            if self.attempts == self.refusals:
                self.up.set()  # the agent now sleeps its longest backoff yet
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return control_pb2.RegisterWorkerResponse(epoch=1, interval=Duration(seconds=100))

    async def LookupKeys(
        self, request: control_pb2.LookupKeysRequest, context: Any
    ) -> control_pb2.LookupKeysResponse:
        return control_pb2.LookupKeysResponse()

    async def DrainWorker(
        self, request: control_pb2.DrainWorkerRequest, context: Any
    ) -> control_pb2.DrainWorkerResponse:
        self.drained.append(request.address)
        return control_pb2.DrainWorkerResponse(drained=True)

    async def UnregisterWorker(
        self, request: control_pb2.UnregisterWorkerRequest, context: Any
    ) -> control_pb2.UnregisterWorkerResponse:
        return control_pb2.UnregisterWorkerResponse()


async def test_a_drain_waiting_for_the_registration_has_it_tried_at_once() -> None:
    """The AMM comes back while the agent sleeps a long registration backoff (its restart took
    a while), and a SIGTERM arrives then: the drain has the registration tried at once, rather
    than wait out the backoff (3.2 s here) past the half of its grace it gives the registration,
    and lose what only this worker holds. Seen in the chaos run's drain-after-restart test under
    load: the registration came 2.5 s after the SIGTERM, too late for a 5 s grace."""
    amm = _RestartingAmm(refusals=6)  # type: ignore[abstract]
    async with (
        fake_amm(amm) as address,
        running_agent(amm=address, register_backoff_max=10.0) as agent,
        dial(agent.address) as stub,
    ):
        await put(stub, "solo", DATA)  # the agent takes data before it registers
        await asyncio.wait_for(amm.up.wait(), 30)
        assert not agent.registered
        assert await agent.drain(grace=2.0)
        assert amm.drained == [agent.address]
        assert amm.attempts == 7


async def test_a_drain_right_after_the_amm_restarted_waits_for_its_channel(
    tmp_path: Path,
) -> None:
    """The AMM restarts (its state file keeps the agent registered) and a SIGTERM comes while
    the agent's channel still waits out its reconnect backoff: the drain waits for the channel
    rather than fail UNAVAILABLE at once and lose what only this worker holds. Seen in the
    chaos run's drain-after-restart test, about one run in two on a quiet machine."""
    config = amm_config(tmp_path, listen=f"127.0.0.1:{free_port()}", start=True)
    amm = AmmServer(config)
    await amm.start()
    async with running_agent(amm=amm.address) as keeper, running_agent(amm=amm.address) as leaver:
        try:
            await wait_for(lambda: keeper.registered and leaver.registered, what="registered")
            async with dial(leaver.address) as stub:
                await put(stub, "solo", DATA)
            async with AsyncClient(amm.address, timeout=10) as client:
                assert await client.who_has("solo", fresh=True) == {"solo": (leaver.address,)}
            await amm.stop()
            channel = leaver._amm_channel
            assert channel is not None
            failed = grpc.ChannelConnectivity.TRANSIENT_FAILURE
            await wait_for(
                lambda: channel.get_state(try_to_connect=True) is failed,
                what="the agent's channel to the AMM in its reconnect backoff",
            )
            amm = AmmServer(config)
            await amm.start()
            assert await leaver.drain(grace=5)
            async with AsyncClient(amm.address, timeout=10) as client:
                holders = (await client.who_has("solo", fresh=True))["solo"]
                assert keeper.address in holders
        finally:
            await amm.stop()


async def test_a_drain_the_amm_refuses_as_from_an_unknown_worker_registers_again_first(
    tmp_path: Path,
) -> None:
    """The AMM declared the worker dead while it was frozen (it held a key put since the AMM's
    last poll), and the SIGTERM comes right after it resumes, before its registration loop
    notices: the AMM answers the drain NOT_FOUND. Before, the agent gave up and exited with a key
    nobody knew of, lost and never reported (chaos episode 3:152, one run in ten). Now it
    registers again and drains."""
    config = amm_config(tmp_path, start=True)
    async with (
        AmmServer(config) as amm,
        running_agent(amm=amm.address) as keeper,
        running_agent(amm=amm.address) as leaver,
    ):
        await wait_for(lambda: keeper.registered and leaver.registered, what="registered")
        manager = amm.manager
        assert manager is not None
        async with dial(leaver.address) as stub:
            await put(stub, "solo", DATA)
        await manager._members.remove(WorkerId(leaver.address), "died (frozen)")
        assert leaver.registered, "the agent has not noticed"
        assert await leaver.drain(grace=5)
        async with AsyncClient(amm.address, timeout=10) as client:
            holders = (await client.who_has("solo", fresh=True))["solo"]
            assert keeper.address in holders
            assert await client.lost_keys() == []
