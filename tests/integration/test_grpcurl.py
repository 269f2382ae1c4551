"""The real grpcurl binary against a real AMM and agent: reflection, health and the control verbs,
exactly as the README shows them."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import dial, put, running_agent
from tests.support.waiting import wait_for

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


async def grpcurl(*args: str) -> str:
    assert GRPCURL is not None, "grpcurl is installed by the dev extras: make install"
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def call(address: str, method: str, body: dict[str, Any] | None = None) -> Any:
    return json.loads(await grpcurl("-d", json.dumps(body or {}), address, method))


async def test_amm_lists_its_services_and_answers_the_control_verbs(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm:
        services = (await grpcurl(amm.address, "list")).split()
        assert {
            "amm.v1.ActiveMemoryManager",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= set(services)
        assert await call(amm.address, "amm.v1.ActiveMemoryManager/Start") == {"running": True}
        status = await call(amm.address, "amm.v1.ActiveMemoryManager/GetStatus")
        assert status["running"] is True
        assert status["epoch"] == str(amm.epoch)  # uint64 is a JSON string
        assert status["measure"] == "MEMORY_MEASURE_OPTIMISTIC"
        assert status["interval"] == "0.200s"
        assert await call(amm.address, "amm.v1.ActiveMemoryManager/Stop") == {}
        health = await call(amm.address, "grpc.health.v1.Health/Check")
        assert health == {"status": "SERVING"}


async def test_agent_lists_its_services_and_reports_keys(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm, running_agent(amm=amm.address) as agent:
        await wait_for(lambda: agent.registered, what="registration")
        services = (await grpcurl(agent.address, "list")).split()
        assert {"amm.v1.WorkerAgent", "grpc.health.v1.Health"} <= set(services)
        described = await grpcurl(agent.address, "describe", "amm.v1.WorkerAgent")
        assert "rpc PromiseKeep" in described
        poll = await call(agent.address, "amm.v1.WorkerAgent/Poll", {"full": True})
        assert poll["status"] == "WORKER_STATUS_RUNNING"
        listed = await call(amm.address, "amm.v1.ActiveMemoryManager/ListWorkers")
        assert [w["address"] for w in listed["workers"]] == [agent.address]


async def test_grpcurl_sees_clear_errors_for_bad_input(tmp_path: Path) -> None:
    assert GRPCURL is not None
    async with AmmServer(amm_config(tmp_path)) as amm:
        proc = await asyncio.create_subprocess_exec(
            GRPCURL,
            "-plaintext",
            "-d",
            '{"keys": ["ghost"]}',
            amm.address,
            "amm.v1.ActiveMemoryManager/WhoHas",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode != 0
        assert "NotFound" in err.decode()
        assert "unknown key(s): 'ghost'" in err.decode()


async def test_grpcurl_sets_and_lists_goals(tmp_path: Path) -> None:
    assert GRPCURL is not None
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        running_agent(amm=amm.address) as one,
        running_agent(amm=amm.address) as two,
    ):
        await wait_for(lambda: one.registered and two.registered, what="registration")
        async with dial(one.address) as stub:
            await put(stub, "x", b"value")
        method = "amm.v1.ActiveMemoryManager/"
        assert await call(amm.address, method + "Replicate", {"keys": ["x"], "n": 2}) == {
            "goals_set": 1
        }
        listed = await call(amm.address, method + "ListGoals")
        assert listed == {"goals": [{"key": "x", "n": 2, "target": 2, "live_copies": 1}]}
        await call(amm.address, method + "RunOnce", {"wait": True})
        await call(amm.address, method + "HasWhat", {"fresh": True})  # the copy made is seen
        status = await call(amm.address, method + "GetStatus")
        assert status["totals"]["keys_with_goal"] == "1"
        assert "keys_below_goal" not in status["totals"]  # zero: met
        proc = await asyncio.create_subprocess_exec(
            GRPCURL,
            "-plaintext",
            "-d",
            '{"keys": ["x"], "n": 0}',
            amm.address,
            method + "Replicate",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode != 0
        assert "InvalidArgument" in err.decode()
        assert "n = 0 is not a goal" in err.decode()


async def test_dry_runs_zones_and_liveness_totals_through_grpcurl(tmp_path: Path) -> None:
    policies = [{"class": "tests.support.policies.TopUp", "copies": 2}]
    async with (
        AmmServer(amm_config(tmp_path, policies=policies)) as amm,
        running_agent(amm=amm.address, zone="rack-a") as one,
        running_agent(amm=amm.address, zone="rack-b") as two,
    ):
        await wait_for(lambda: one.registered and two.registered, what="registrations")
        async with dial(one.address) as stub:
            await put(stub, "x", b"payload")
        listed = await call(amm.address, "amm.v1.ActiveMemoryManager/ListWorkers", {"fresh": True})
        assert {w["address"]: w["zone"] for w in listed["workers"]} == {
            one.address: "rack-a",
            two.address: "rack-b",
        }
        assert {w["status"] for w in listed["workers"]} == {"WORKER_STATUS_RUNNING"}
        dry = await call(amm.address, "amm.v1.ActiveMemoryManager/RunOnce", {"dry_run": True})
        cycle = dry["cycle"]
        assert cycle["dry_run"] is True
        assert "directives_sent" not in cycle  # zero: nothing was sent
        (planned,) = cycle["directives"]
        assert planned["worker"] == two.address
        assert planned["policy"] == "TopUp"
        assert planned["directive"]["reason"] == "1 of 2 copies"
        status = await call(amm.address, "amm.v1.ActiveMemoryManager/GetStatus")
        assert "startup_grace" not in status  # false: no known worker is missing
        assert "lost_keys" not in status["totals"]
        assert "stale_workers" not in status["totals"]
        assert "directives_in_flight" not in status["totals"]  # the dry run sent nothing


async def test_grpcurl_retires_a_worker(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm, running_agent(amm=amm.address) as agent:
        await wait_for(lambda: agent.registered, what="registration")
        body = {"workers": [agent.address], "close": True, "timeout": "10s"}
        answer = await call(amm.address, "amm.v1.ActiveMemoryManager/RetireWorkers", body)
        (result,) = answer["results"]
        assert result["worker"] == agent.address
        assert (result["retired"], result["closed"]) == (True, True)
        await asyncio.wait_for(agent.stopped.wait(), 10)
