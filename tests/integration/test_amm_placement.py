"""Where copies go and how many transfers run at once, with real agents: zones first, per-worker
transfer limits, and dry runs that plan without sending. AMM and agents run in this process; the
CLI runs in a thread against them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from amm import AsyncClient
from amm.base.serving import CHANNEL_OPTIONS
from amm.cli import main as cli_main
from amm.v1 import control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import dial, put, running_agent
from tests.support.waiting import wait_for
from worker_agent.agent import Agent

if TYPE_CHECKING:
    from amm.v1.agent_pb2_grpc import WorkerAgentAsyncStub
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub

DATA = b"0123456789" * 100


def top_up(copies: int, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    spec: dict[str, Any] = {"class": "tests.support.policies.TopUp", "copies": copies}
    if keys is not None:
        spec["keys"] = list(keys)
    return [spec]


@dataclass
class Cluster:
    amm: AmmServer
    control: ActiveMemoryManagerAsyncStub
    agents: list[Agent]
    stubs: list[WorkerAgentAsyncStub]

    async def run_once(self, **kwargs: bool) -> types_pb2.CycleReport:
        return (await self.control.RunOnce(control_pb2.RunOnceRequest(**kwargs))).cycle

    async def holders(self, key: str) -> set[str]:
        resp = await self.control.WhoHas(control_pb2.WhoHasRequest(keys=[key], fresh=True))
        return set(resp.entries[0].workers)


@asynccontextmanager
async def cluster(
    tmp_path: Path, zones: Sequence[str], **amm_overrides: Any
) -> AsyncIterator[Cluster]:
    """An AMM (managed memory) and one agent per entry of ``zones`` ("" for none)."""
    async with AsyncExitStack() as stack:
        config = amm_config(tmp_path, measure="managed", **amm_overrides)
        amm = await stack.enter_async_context(AmmServer(config))
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS)
        )
        agents = [
            await stack.enter_async_context(running_agent(amm=amm.address, zone=zone))
            for zone in zones
        ]
        stubs = [await stack.enter_async_context(dial(a.address)) for a in agents]
        await wait_for(lambda: all(a.registered for a in agents), what="registrations")
        yield Cluster(amm, control_pb2_grpc.ActiveMemoryManagerStub(channel), agents, stubs)


async def test_a_second_copy_goes_to_the_other_zone(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "a", "b"], policies=top_up(2, keys=["x"])) as c:
        a1, a2, b1 = (agent.address for agent in c.agents)
        await put(c.stubs[0], "x", DATA)
        await put(c.stubs[2], "ballast", DATA * 100)  # b1 is by far the fullest
        listed = await c.control.ListWorkers(control_pb2.ListWorkersRequest(fresh=True))
        assert {w.address: w.zone for w in listed.workers} == {a1: "a", a2: "a", b1: "b"}
        report = await c.run_once(wait=True)
        assert [(d.worker, list(d.directive.sources)) for d in report.directives] == [(b1, [a1])]
        assert report.applied == 1
        assert await c.holders("x") == {a1, b1}


@pytest.mark.parametrize(
    ("limits", "first_cycle", "throttled"),
    [
        # Each recipient takes one; the other keys wait (TopUp stops at a key's first "no").
        ({"max_incoming_transfers": 1, "max_outgoing_transfers": 0}, 2, 3),
        # The one holder serves one; every key waits.
        ({"max_incoming_transfers": 0, "max_outgoing_transfers": 1}, 1, 4),
    ],
)
async def test_transfer_limits_cap_each_cycles_directives(
    tmp_path: Path, limits: dict[str, int], first_cycle: int, throttled: int
) -> None:
    keys = [f"k{i}" for i in range(4)]
    async with cluster(tmp_path, ["", "", ""], policies=top_up(3), **limits) as c:
        for key in keys:
            await put(c.stubs[0], key, DATA)
        incoming, outgoing = limits["max_incoming_transfers"], limits["max_outgoing_transfers"]
        sent = 0
        for number in range(8):
            report = await c.run_once(wait=True)
            if number == 0:
                assert report.directives_sent == first_cycle
                assert {r.reason.split(":")[0] for r in report.rejections} == {"throttled"}
                assert report.rejected == throttled
            recipients = [d.worker for d in report.directives]
            sources = [d.directive.sources[0] for d in report.directives]
            if incoming:
                assert all(recipients.count(w) <= incoming for w in recipients)
            if outgoing:
                assert all(sources.count(w) <= outgoing for w in sources)
            assert report.applied == report.directives_sent
            sent += report.directives_sent
            if report.directives_sent == 0:
                break
        assert sent == 2 * len(keys)
        for key in keys:
            assert await c.holders(key) == {a.address for a in c.agents}


async def test_a_dry_run_reports_policy_and_reason_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with cluster(tmp_path, ["", ""], policies=top_up(2)) as c:
        manager = c.amm.manager
        assert manager is not None
        w1, w2 = (agent.address for agent in c.agents)
        await put(c.stubs[0], "x", DATA)
        report = await c.run_once(dry_run=True, wait=True)
        assert report.dry_run
        assert report.directives_sent == 0
        (planned,) = report.directives
        assert (planned.worker, planned.policy) == (w2, "TopUp")
        assert (planned.directive.reason, list(planned.directive.sources)) == (
            "1 of 2 copies",
            [w1],
        )
        assert not planned.HasField("sent_at")
        assert not planned.HasField("outcome")
        assert len(manager.ledger) == 0
        assert await c.holders("x") == {w1}

        async with AsyncClient(c.amm.address, timeout=10) as client:
            seen = await client.amm.run_once(dry_run=True)
        assert seen.dry_run
        assert [(d.key, d.worker, d.policy, d.policy_reason) for d in seen.directives] == [
            ("x", w2, "TopUp", "1 of 2 copies")
        ]
        amm = ["--amm", c.amm.address]
        assert await asyncio.to_thread(cli_main, [*amm, "run-once", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "would be sent (nothing was)" in out
        assert "1 of 2 copies" in out
        assert await asyncio.to_thread(cli_main, [*amm, "run-once", "--dry-run", "--json"]) == 0
        parsed = json.loads(capsys.readouterr().out)
        assert parsed["dry_run"] is True
        assert parsed["directives"][0]["policy_reason"] == "1 of 2 copies"
        assert await c.holders("x") == {w1}
        assert len(manager.ledger) == 0

        # Planning is not acting: a registration reporting a newer epoch still moves ours.
        epoch = manager.epoch
        await manager.register(w1, "", c.agents[0].incarnation, epoch=epoch + 5)
        assert manager.epoch == epoch + 6

        # A real cycle sends what the dry run showed.
        done = await c.run_once(wait=True)
        assert not done.dry_run
        assert [(d.worker, d.directive.reason) for d in done.directives] == [(w2, "1 of 2 copies")]
        assert done.applied == 1
        assert await c.holders("x") == {w1, w2}
