"""The AMM when agents misbehave: a worker killed outright, a directive stream that breaks, and
calls that arrive while the AMM shuts down."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm import Client
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.errors import Unavailable
from tests.conftest import amm_config
from tests.support.faults import fake_peer
from tests.support.processes import local_cluster


def test_a_killed_worker_stops_counting_and_cycles_do_not_hang() -> None:
    with local_cluster(2) as cluster, Client(cluster.address, timeout=10) as client:
        w1, w2 = client.has_what()
        client.put("x", b"v" * 1000, workers=[w1, w2])
        assert client.who_has("x") == {"x": (w1, w2)}  # the AMM has seen both copies
        cluster.stop_worker(w2, signal.SIGKILL)
        started = time.monotonic()
        report = client.amm.run_once()
        assert time.monotonic() - started < 5
        assert w2 in report.unreachable_workers
        # w1's copy is the only one that counts: ReduceReplicas has nothing to drop.
        assert report.directives_sent == 0
        assert report.suggestions == 0
        (info,) = [w for w in client.workers() if w.address == w2]
        assert info.missed_polls >= 1
        assert client.status().totals.unreachable_workers == 1
        assert client.get("x", worker=w1) == b"v" * 1000


def test_a_goal_is_kept_when_a_holder_process_is_killed() -> None:
    with local_cluster(4) as cluster, Client(cluster.address, timeout=10) as client:
        client.put("x", b"v" * 1000, workers=[cluster.workers[0]])
        client.replicate("x", n=3)
        client.amm.run_once()
        holders = client.who_has("x")["x"]
        assert len(holders) == 3
        # A poll shows the copies made (a fresh who_has of a key asks for that key only): the
        # holder killed is one the AMM knows holds x (for a copy only answered as applied, see
        # the test below).
        client.workers(fresh=True)
        cluster.stop_worker(holders[-1], signal.SIGKILL)
        report = client.amm.run_once()
        assert [(d.op, d.outcome) for d in report.directives] == [("replicate", "applied")]
        client.workers(fresh=True)  # a fresh poll sees the new copy
        assert client.goals("x")[0].live_copies == 3
        for _ in range(3):
            assert client.amm.run_once().suggestions == 0
        assert client.status().totals.keys_below_goal == 0


def test_a_copy_applied_on_a_worker_killed_before_its_next_poll_is_made_again() -> None:
    """The copy counted as in flight until its worker was dropped (dead-after, 30 s here): the
    key stayed below its goal all that time, with nothing planned for it."""
    with local_cluster(4) as cluster, Client(cluster.address, timeout=10) as client:
        client.put("x", b"v" * 1000, workers=[cluster.workers[0]])
        client.replicate("x", n=3)
        report = client.amm.run_once()
        copies = [
            d.worker for d in report.directives if (d.op, d.outcome) == ("replicate", "applied")
        ]
        assert len(copies) == 2
        # No poll since: the AMM knows the copies only from the agents' answers.
        cluster.stop_worker(copies[-1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            report = client.amm.run_once()
            made = [(d.op, d.outcome) for d in report.directives]
            if made or time.monotonic() > deadline:
                break
        assert made == [("replicate", "applied")]
        assert client.status().totals.directives_in_flight == 1  # the new copy, until polled
        client.workers(fresh=True)  # a fresh poll sees the new copy
        assert client.goals("x")[0].live_copies == 3


class _BrokenStream(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls with one key; breaks every directive stream at the first directive."""

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return agent_pb2.PollResponse(
            incarnation="broken",
            version=1,
            full=True,
            keys=[types_pb2.KeyInfo(key="x", size=1, checksum="a" * 64)],
            status=types_pb2.WORKER_STATUS_RUNNING,
        )

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in request_iterator:
            await context.abort(grpc.StatusCode.INTERNAL, "injected fault")
        yield agent_pb2.DirectivesResponse()  # pragma: no cover


async def test_a_broken_directive_stream_fails_its_directives_at_once(tmp_path: Path) -> None:
    async with (
        AmmServer(amm_config(tmp_path, directive_timeout="60s")) as amm,
        fake_peer(_BrokenStream()) as one,  # type: ignore[abstract]
        fake_peer(_BrokenStream()) as two,  # type: ignore[abstract]
    ):
        assert amm.manager is not None
        await amm.manager.register(one, "one", "broken")
        await amm.manager.register(two, "two", "broken")
        started = time.monotonic()
        record = await amm.manager.run_cycle(wait=True)
        assert time.monotonic() - started < 5
        (rec,) = record.directives.values()
        assert rec.outcome is not None
        assert rec.outcome.status.value == "failed"
        assert "directive stream broke" in rec.outcome.message
        assert len(amm.manager.ledger) == 0
        assert amm.manager.outcomes.refusals[0].outcome.status.value == "failed"


async def test_calls_during_shutdown_are_refused_cleanly(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm:
        assert amm.manager is not None
        manager = amm.manager
        await manager.close()
        for call in (manager.start(), manager.run_cycle(), manager.queries.refresh(True)):
            with pytest.raises(Unavailable, match="shutting down"):
                await call
        assert not manager.running
