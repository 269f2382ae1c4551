"""Worker liveness and the start-up grace with real servers: a worker that falls silent goes STALE,
then DEAD, and the keys only it held are reported LOST; a frozen agent process comes back and is
reconciled; a restarted AMM drops nothing until the workers it knew have reported."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm import Client
from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.cli import main as cli_main
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.core import Why
from amm_service.decisions.view import Key
from amm_service.runtime.manager import ActiveMemoryManager
from amm_service.runtime.records.cycle import CycleRecord
from tests.conftest import amm_config, free_port
from tests.support.agent import dial, put, running_agent
from tests.support.faults import fake_peer
from tests.support.processes import local_cluster
from tests.support.waiting import poll_until, wait_for
from worker_agent.agent import Agent

DATA = b"0123456789" * 100
SOLO = b"only here" * 10


class _Holder(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls as an agent holding ``keys`` would; the test stops its server to make the
    worker fall silent without unregistering, as a crashed or partitioned one does."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self._keys = keys

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return agent_pb2.PollResponse(
            incarnation="holder",
            version=1,
            full=True,
            keys=[
                types_pb2.KeyInfo(key=k, size=len(v), checksum=checksum(v))
                for k, v in self._keys.items()
            ],
            status=types_pb2.WORKER_STATUS_RUNNING,
            zone="rack-9",
        )


async def test_a_silent_worker_goes_stale_then_dead_and_its_lone_keys_are_lost(
    tmp_path: Path,
) -> None:
    config = amm_config(tmp_path, stale_after="150ms", dead_after="500ms", poll_timeout="200ms")
    async with (
        AmmServer(config) as amm,
        running_agent(amm=amm.address) as agent,
        dial(agent.address) as stub,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        manager = amm.manager
        assert manager is not None
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        await wait_for(lambda: agent.registered, what="registration")
        await put(stub, "shared", DATA)
        async with fake_peer(_Holder({"shared": DATA, "solo": SOLO})) as silent:  # type: ignore[abstract]
            await manager.register(silent, "silent", "holder")
            await manager.queries.refresh(fresh=True)
            assert manager.state.keys[Key("solo")].holders == {silent}
        # Its server is gone: polls fail from now on. One missed poll is not yet STALE.
        record = await manager.run_cycle()
        assert record.unreachable == (silent,)

        async def cycle_then_status() -> control_pb2.GetStatusResponse:
            await manager.run_cycle()
            return await control.GetStatus(control_pb2.GetStatusRequest())

        status = await wait_for(cycle_then_status, lambda s: s.totals.stale_workers == 1)
        assert status.totals.workers == 2
        listed = await control.ListWorkers(control_pb2.ListWorkersRequest())
        (info,) = [w for w in listed.workers if w.address == silent]
        assert info.status == types_pb2.WORKER_STATUS_STALE
        assert info.reported_status == types_pb2.WORKER_STATUS_RUNNING
        assert info.zone == "rack-9"

        status = await wait_for(cycle_then_status, lambda s: s.totals.workers == 1, what="death")
        assert (status.totals.stale_workers, status.totals.lost_keys) == (0, 1)
        kinds = [e.kind for e in status.recent_events]
        assert kinds.index("key-lost") < kinds.index("worker-dead") < kinds.index("worker-stale")
        events = {e.kind: e for e in status.recent_events}
        assert (events["key-lost"].worker, list(events["key-lost"].keys)) == (silent, ["solo"])
        assert list(events["worker-dead"].keys) == ["shared", "solo"]
        who = await control.WhoHas(control_pb2.WhoHasRequest(keys=["shared"]))
        assert list(who.entries[0].workers) == [agent.address]

        # Put again: the key is held once more and no longer lost.
        await put(stub, "solo", SOLO)
        status = await cycle_then_status()
        assert status.totals.lost_keys == 0
        assert status.recent_events[0].kind == "key-recovered"
        assert list(status.recent_events[0].keys) == ["solo"]


def test_a_frozen_agent_is_declared_dead_then_comes_back_reconciled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--stale-after", "300ms", "--dead-after", "1500ms", "--poll-timeout", "200ms"]
    zones = ["rack-a", "rack-b"]
    with (
        local_cluster(2, service_args=args, zones=zones) as cluster,
        Client(cluster.address, timeout=10) as c,
    ):
        amm = ["--amm", cluster.address]
        w1, w2 = c.has_what()
        assert sorted(w.zone for w in c.workers()) == zones
        c.put("shared", DATA, workers=[w1, w2])
        c.put("solo", SOLO, workers=[w2])
        assert c.who_has() == {"shared": (w1, w2), "solo": (w2,)}
        cluster.signal_worker(w2, signal.SIGSTOP)
        try:

            def cycle_then_statuses() -> dict[str, str]:
                c.amm.run_once()
                return {w.address: w.status for w in c.workers()}

            poll_until(lambda: cycle_then_statuses().get(w2) == "stale", what="stale")
            assert cli_main([*amm, "workers"]) == 0
            out = capsys.readouterr().out
            assert "stale (" in out
            assert "rack-a" in out
            poll_until(lambda: list(cycle_then_statuses()) == [w1], what="declared dead")
            status = c.status()
            assert status.totals.lost_keys == 1
            (lost,) = [e for e in status.recent_events if e.kind == "key-lost"]
            assert (lost.worker, lost.keys) == (w2, ("solo",))
            assert c.who_has() == {"shared": (w1,)}
            assert cli_main([*amm, "status"]) == 0
            out = capsys.readouterr().out
            assert "1 key (no copy left)" in out
            assert "worker-dead" in out
        finally:
            cluster.signal_worker(w2, signal.SIGCONT)
        # Nobody polls it any more: it registers again, and a full poll brings its keys back.
        poll_until(
            lambda: c.who_has() == {"shared": (w1, w2), "solo": (w2,)}, what="reconciliation"
        )
        assert c.status().totals.lost_keys == 0
        c.amm.run_once()
        assert "key-recovered" in [e.kind for e in c.status().recent_events]


# -- start-up grace ------------------------------------------------------------------------------


@dataclass
class Restarted:
    """A second AMM on the first one's state file; ``gone`` is a worker the first knew that is
    down, ``holders`` two live agents both holding ``x`` (one copy is excess)."""

    amm: AmmServer
    manager: ActiveMemoryManager
    holders: list[Agent]
    gone: str


@asynccontextmanager
async def restarted(tmp_path: Path, **overrides: Any) -> AsyncIterator[Restarted]:
    # Back at the same address: agents take epochs only from the AMM they are configured with.
    config = amm_config(tmp_path, listen=f"127.0.0.1:{free_port()}", **overrides)
    gone = f"127.0.0.1:{free_port()}"
    async with AsyncExitStack() as stack, AsyncExitStack() as b_stack:
        async with AmmServer(config) as first:
            b = await b_stack.enter_async_context(running_agent(amm=first.address, listen=gone))
            holders = [
                await stack.enter_async_context(running_agent(amm=first.address)) for _ in "ac"
            ]
            await wait_for(lambda: all(x.registered for x in [b, *holders]), what="registered")
            for agent in holders:  # the restarted AMM learns of them only from polls
                async with dial(agent.address) as stub:
                    await put(stub, "x", DATA)
        # b stops after the AMM: it cannot unregister, and stays a known worker.
        await b_stack.aclose()
        second = await stack.enter_async_context(AmmServer(config))
        assert second.manager is not None
        yield Restarted(second, second.manager, holders, gone)


async def test_a_restarted_amm_drops_nothing_until_the_known_workers_report(
    tmp_path: Path,
) -> None:
    async with restarted(tmp_path, startup_grace="30s") as r:
        assert r.manager.in_startup_grace()
        record = await r.manager.run_cycle(wait=True)
        assert record.startup_grace
        assert record.directives == {}
        assert [(x.key, x.why) for x in record.rejections] == [("x", Why.GRACE)]
        async with grpc.aio.insecure_channel(r.amm.address, options=CHANNEL_OPTIONS) as channel:
            control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
            status = await control.GetStatus(control_pb2.GetStatusRequest())
            assert status.startup_grace
            # The worker it was waiting for comes back and reports: drops resume.
            async with running_agent(amm=r.amm.address, listen=r.gone) as back:
                await wait_for(lambda: back.registered, what="re-registration")
                record = await r.manager.run_cycle(wait=True)
                assert not record.startup_grace
                assert [d.directive.key for d in record.directives.values()] == ["x"]
                assert [
                    d.outcome.status.value for d in record.directives.values() if d.outcome
                ] == ["applied"]
                status = await control.GetStatus(control_pb2.GetStatusRequest())
                assert not status.startup_grace
                (ended,) = r.manager.events.of_kind("startup-grace-ended")
                assert "every worker known before the restart has reported" in ended.message


async def test_the_grace_ends_after_its_period_when_a_known_worker_never_reports(
    tmp_path: Path,
) -> None:
    async with restarted(tmp_path, startup_grace="300ms") as r:
        first = await r.manager.run_cycle(wait=True)
        assert first.startup_grace
        assert first.directives == {}

        async def cycle() -> CycleRecord:
            return await r.manager.run_cycle(wait=True)

        record = await wait_for(cycle, lambda rec: not rec.startup_grace, what="grace over")
        assert [d.directive.key for d in record.directives.values()] == ["x"]
        (ended,) = r.manager.events.of_kind("startup-grace-ended")
        assert f"1 known worker(s) never reported: {r.gone}" in ended.message
        # The silent worker stays listed until the liveness rules declare it dead.
        assert r.gone in r.manager.state.worker_ids
