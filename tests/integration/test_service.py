"""The AMM service on its own: control verbs, persistence across restarts, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.policies import PolicyError
from tests.conftest import amm_config

if TYPE_CHECKING:
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub as Stub


async def test_start_stop_running(control: Stub) -> None:
    assert not (await control.Running(control_pb2.RunningRequest())).running
    assert (await control.Start(control_pb2.StartRequest())).running
    assert (await control.Start(control_pb2.StartRequest())).running  # idempotent
    assert (await control.Running(control_pb2.RunningRequest())).running
    assert not (await control.Stop(control_pb2.StopRequest())).running
    assert not (await control.Running(control_pb2.RunningRequest())).running


async def test_run_once_works_while_stopped_and_counts_cycles(control: Stub) -> None:
    first = await control.RunOnce(control_pb2.RunOnceRequest(wait=True))
    second = await control.RunOnce(control_pb2.RunOnceRequest())
    assert second.cycle.number == first.cycle.number + 1
    status = await control.GetStatus(control_pb2.GetStatusRequest())
    assert status.cycles == 2
    assert status.last_cycle.number == second.cycle.number
    assert not status.running
    assert status.measure == types_pb2.MEMORY_MEASURE_OPTIMISTIC
    assert status.interval.ToMilliseconds() == 200
    assert [p.name for p in status.policies] == ["Replicate", "ReduceReplicas", "RetireWorker"]
    assert status.epoch >= 1


async def test_epoch_and_running_flag_survive_a_restart(tmp_path: Path) -> None:
    config = amm_config(tmp_path)
    async with AmmServer(config) as first:
        assert first.manager is not None
        await first.manager.start()
    async with AmmServer(config) as second:
        assert second.epoch > first.epoch
        assert second.manager is not None
        assert second.manager.running
        await second.manager.stop()
    async with AmmServer(config) as third:
        assert third.epoch > second.epoch
        assert third.manager is not None
        assert not third.manager.running


async def test_start_flag_in_config_starts_cycling(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path, start=True)) as server:
        assert server.manager is not None
        assert server.manager.running


async def test_unknown_policy_refuses_to_start(tmp_path: Path) -> None:
    config = amm_config(tmp_path, policies=[{"class": "nope.Nope"}])
    with pytest.raises(PolicyError, match="cannot import policy module 'nope'"):
        AmmServer(config)


@pytest.mark.parametrize(
    ("call", "request_", "code", "words"),
    [
        (
            "RegisterWorker",
            control_pb2.RegisterWorkerRequest(address="nohost"),
            "INVALID_ARGUMENT",
            "must be HOST:PORT",
        ),
        (
            "RegisterWorker",
            control_pb2.RegisterWorkerRequest(address="h:99999"),
            "INVALID_ARGUMENT",
            "must be HOST:PORT",
        ),
        (
            "UnregisterWorker",
            control_pb2.UnregisterWorkerRequest(),
            "INVALID_ARGUMENT",
            "address is required",
        ),
        (
            "WhoHas",
            control_pb2.WhoHasRequest(keys=["ghost"]),
            "NOT_FOUND",
            "unknown key(s): 'ghost'",
        ),
        ("WhoHas", control_pb2.WhoHasRequest(keys=[""]), "INVALID_ARGUMENT", "empty"),
        (
            "HasWhat",
            control_pb2.HasWhatRequest(workers=["127.0.0.1:1"]),
            "NOT_FOUND",
            "unknown worker(s): '127.0.0.1:1'",
        ),
        ("Forget", control_pb2.ForgetRequest(), "INVALID_ARGUMENT", "no keys given"),
        ("Forget", control_pb2.ForgetRequest(keys=["ghost"]), "NOT_FOUND", "unknown key(s)"),
    ],
)
async def test_bad_input_gets_a_clear_status(
    control: Stub, call: str, request_: object, code: str, words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(control, call)(request_)
    assert info.value.code().name == code
    assert words in (info.value.details() or "")
    # The server keeps serving.
    assert not (await control.Running(control_pb2.RunningRequest())).running


async def test_unregistering_an_unknown_worker_is_harmless(control: Stub) -> None:
    resp = await control.UnregisterWorker(control_pb2.UnregisterWorkerRequest(address="h:1"))
    assert resp.removed is False


async def test_oversized_messages_are_refused_and_the_server_survives(amm: AmmServer) -> None:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(amm.address, options=options) as channel:
        stub: Stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WhoHas(control_pb2.WhoHasRequest(keys=["k" * (20 * 1024 * 1024)]))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel:
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        assert not (await stub.Running(control_pb2.RunningRequest())).running
