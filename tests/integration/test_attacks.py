"""Issue 9's attacks, replayed without TLS: a real AMM and real agents on loopback, and raw stubs
playing the attacker. Each test failed against the code before the fix it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from worker_agent.config import AgentConfig


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


# -- 6. RegisterWorker takes what the agent's own flags refuse --------------------------------


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"address": "h" * 300 + ":5000"}, "must be HOST:PORT"),
        ({"address": "unix:/tmp/sock:1"}, "must be HOST:PORT"),
        ({"zone": "rack a"}, "zone must not contain whitespace"),
        ({"zone": "rack\na"}, "zone must not contain whitespace"),
        ({"name": "w\n1"}, "name must hold printable characters"),
        ({"name": "n" * 300}, "name must be at most 256"),
        ({"incarnation": "x\ny"}, "incarnation must be"),
    ],
)
async def test_registration_refuses_what_the_agent_flags_refuse(
    tmp_path: Path, fields: dict[str, str], words: str
) -> None:
    request: dict[str, Any] = {
        "address": "127.0.0.1:5000",
        "name": "w1",
        "incarnation": "i1",
        **fields,
    }
    agent_fields = {
        "advertise": request["address"],
        "name": request["name"],
        "zone": request.get("zone", ""),
    }
    if "incarnation" not in fields:  # the agent's flags have no incarnation: it makes its own
        with pytest.raises(ValueError, match=words):
            AgentConfig(**agent_fields)
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        code, details = await _code(
            stub.RegisterWorker(control_pb2.RegisterWorkerRequest(**request))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert words in details
        listed = await stub.ListWorkers(control_pb2.ListWorkersRequest())
        assert not listed.workers
