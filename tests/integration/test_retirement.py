"""Retiring workers through the real AMM and real agents: RetireWorkers, PauseToRetire, agent
Close and an AMM restarted mid-retirement. The AMM and agents run in this process on loopback,
except where an agent process must exit (``LocalCluster``)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm import AmmError, AsyncClient, Client
from amm.cli import main as cli_main
from amm.v1 import agent_pb2, control_pb2
from amm_service.api.server import AmmServer
from tests.conftest import amm_config, free_port
from tests.support.agent import dial, put, running_agent
from tests.support.processes import local_cluster
from tests.support.waiting import poll_until, wait_for
from worker_agent.agent import Agent

DATA = b"r" * 1000
RETIREMENT_EVENTS = frozenset({"retire-started", "retired", "retire-abandoned"})
PAUSED_ALWAYS = {"memory_limit": 1024 * 1024}
"""An agent whose process (this test process, tens of MiB) is always above 0.8 MiB: paused."""


class Cluster:
    """An AMM, a client of it and agents registered with it."""

    def __init__(self, amm: AmmServer, client: AsyncClient, agents: list[Agent]) -> None:
        self.amm = amm
        self.client = client
        self.agents = agents
        self.addresses = [a.address for a in agents]

    async def statuses(self) -> dict[str, str]:
        return {w.address: w.status for w in await self.client.workers(fresh=True)}

    async def holders(self, key: str) -> set[str]:
        return set((await self.client.who_has(key))[key])

    async def events(self) -> list[tuple[str, str, str]]:
        status = await self.control.GetStatus(control_pb2.GetStatusRequest())
        return [(e.kind, e.worker, e.message) for e in status.recent_events]

    @property
    def control(self) -> Any:
        return self.client._amm_stub()

    async def cycle(self) -> None:
        await self.client.amm.run_once()


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    n: int,
    *,
    agent_options: Sequence[Mapping[str, Any]] = (),
    **amm_overrides: Any,
) -> AsyncIterator[Cluster]:
    overrides = {"measure": "managed", "interval": "50ms", **amm_overrides}
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(AmmServer(amm_config(tmp_path, **overrides)))
        client = await stack.enter_async_context(AsyncClient(amm.address, timeout=10))
        agents = []
        for i in range(n):
            options = {"lease": 0.3, **(agent_options[i] if i < len(agent_options) else {})}
            agents.append(
                await stack.enter_async_context(running_agent(amm=amm.address, **options))
            )
        await wait_for(client.workers, lambda ws: len(ws) == n, what="agents registered")
        yield Cluster(amm, client, agents)


async def test_retiring_a_worker_while_a_client_puts_and_reads_loses_nothing(
    tmp_path: Path,
) -> None:
    rng = random.Random(31)
    async with cluster(tmp_path, 3, start=True, interval="20ms") as c:
        retiring = c.addresses[0]
        values: dict[str, bytes] = {}
        for i, worker in enumerate(c.addresses * 4):
            values[f"pre{i}"] = rng.randbytes(rng.randrange(100, 3000))
            await c.client.put(f"pre{i}", values[f"pre{i}"], workers=[worker])

        async def read(key: str, worker: str) -> bytes:
            """A read through ``worker`` (which keeps a replica); while keys move, the holders
            the AMM named may have dropped the key already: ask again."""
            for _ in range(50):
                try:
                    return await c.client.get(key, worker=worker)
                except AmmError as err:
                    if err.status not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                        raise
                    await asyncio.sleep(0.02)
            raise AssertionError(f"{key!r} could not be read through {worker}")

        async def busy_client() -> None:
            for i in range(80):
                worker = rng.choice(c.addresses)  # the retiring worker included
                if rng.random() < 0.4:
                    key = f"new{i}"
                    values[key] = rng.randbytes(rng.randrange(100, 3000))
                    await c.client.put(key, values[key], workers=[worker])
                else:
                    key = rng.choice(sorted(values))
                    assert await read(key, worker) == values[key]

        await c.client.pin("pre0", retiring)  # holds the retirement up while the client works
        retire = asyncio.ensure_future(c.client.retire_workers([retiring], close=False))
        await wait_for(c.statuses, lambda s: s[retiring] == "retiring", what="retiring")
        await busy_client()
        assert not retire.done()
        await c.client.unpin("pre0", retiring)
        (result,) = await retire
        assert (result.worker, result.retired, result.closed) == (retiring, True, False)
        assert "holds nothing" in result.reason
        await wait_for(
            lambda: c.client.has_what(retiring),
            lambda hw: hw[retiring] == (),
            what="the retired worker empty",
        )
        assert (await c.statuses())[retiring] == "retired"
        placement = await c.client.who_has()
        assert set(placement) == set(values)
        for key, value in values.items():
            assert retiring not in placement[key]
            assert await c.client.get(key, worker=placement[key][0]) == value
        # Its retirement started and ended retired, nothing lost meanwhile. Other events may
        # come between: at load 10+ a drop the retiring agent refused (NO_CONFIRMED_HOLDER: the
        # keeper's promise came back after half its 0.3 s lease) is sent again by a later
        # cycle, as it should be (1 run in 8 failed on the order of events alone).
        # Read in the AMM (1,000 kept), not over GetStatus (the last 100): every refusal is one.
        assert c.amm.manager is not None
        events = [(e.kind, e.worker, e.message) for e in c.amm.manager.events.recent()]
        ends = [k for k, w, _ in events if w == retiring and k in RETIREMENT_EVENTS]
        assert ends == ["retired", "retire-started"], events  # newest first
        assert [e for e in events if e[0] == "key-lost"] == []


async def test_retirement_with_no_room_elsewhere_is_abandoned_with_the_reason(
    tmp_path: Path,
) -> None:
    small = {"memory_limit": 5000, "pause_fraction": None}
    async with cluster(tmp_path, 2, agent_options=[{}, small]) as c:
        full = c.addresses[0]
        await c.client.put("big", DATA * 10, workers=[full])
        (result,) = await c.client.retire_workers([full], close=True)
        assert (result.worker, result.retired, result.closed) == (full, False, False)
        assert result.reason == (
            "cannot move 'big' elsewhere: no candidate has room for the key under its memory limit"
        )
        assert (await c.statuses())[full] == "running"
        assert await c.holders("big") == {full}
        assert await c.client.get("big") == DATA * 10
        kind, worker, message = (await c.events())[0]
        assert (kind, worker) == ("retire-abandoned", full)
        assert "no candidate has room" in message
        assert not c.agents[0].stopped.is_set()


async def test_a_retirement_past_its_timeout_is_abandoned(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        held, other = c.addresses
        await c.client.put("k", DATA, workers=[held])
        await c.client.pin("k", held)  # a reader: k is never dropped there
        (result,) = await c.client.retire_workers(held, close=True, timeout="300ms")
        assert (result.retired, result.reason) == (False, "timeout: still holds 1 key(s)")
        assert (await c.statuses())[held] == "running"
        assert await c.holders("k") == {held, other}, "copied, never dropped"
        status = await c.client.status()
        assert status.totals.retiring_workers == 0


async def test_n_picks_the_idle_workers_holding_the_fewest_bytes(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4) as c:
        pinned, big, small, empty = c.addresses
        await c.client.put("p", b"p", workers=[pinned])
        await c.client.pin("p", pinned)
        await c.client.put("big", DATA * 5, workers=[big])
        await c.client.put("small", DATA, workers=[small])
        results = await c.client.retire_workers(n=2, close=False)
        assert {(r.worker, r.retired) for r in results} == {(small, True), (empty, True)}
        statuses = await c.statuses()
        assert [statuses[w] for w in c.addresses] == ["running", "running", "retired", "retired"]
        assert await c.holders("small") == {pinned}, "to the lowest memory worker"


async def test_retire_workers_rejects_bad_requests_with_clear_statuses(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as c:
        (worker,) = c.addresses
        cases: list[tuple[control_pb2.RetireWorkersRequest, grpc.StatusCode, str]] = [
            (control_pb2.RetireWorkersRequest(), grpc.StatusCode.INVALID_ARGUMENT, "or n"),
            (control_pb2.RetireWorkersRequest(n=0), grpc.StatusCode.INVALID_ARGUMENT, "at least"),
            (
                control_pb2.RetireWorkersRequest(workers=["127.0.0.1:1"]),
                grpc.StatusCode.NOT_FOUND,
                "unknown worker(s): '127.0.0.1:1'",
            ),
        ]
        negative = control_pb2.RetireWorkersRequest(workers=[worker])
        negative.timeout.FromMilliseconds(-5)
        cases.append((negative, grpc.StatusCode.INVALID_ARGUMENT, "timeout must be positive"))
        for request, code, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.control.RetireWorkers(request)
            assert info.value.code() == code
            assert message in (info.value.details() or "")
        with pytest.raises(AmmError, match="not both"):
            await c.client.retire_workers([worker], n=1)
    no_retirer = [{"class": "ReduceReplicas"}]
    async with cluster(tmp_path, 1, policies=no_retirer) as c:
        with pytest.raises(AmmError, match="needs the RetireWorker policy") as err:
            await c.client.retire_workers(n=1)
        assert err.value.status == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_caller_that_hangs_up_leaves_the_retirement_to_later_cycles(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 2) as c:
        held, other = c.addresses
        await c.client.put("k", DATA, workers=[held])
        await c.client.pin("k", held)
        request = control_pb2.RetireWorkersRequest(workers=[held])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.control.RetireWorkers(request, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await c.statuses())[held] == "retiring"
        assert (await c.client.status()).totals.retiring_workers == 1
        await c.client.unpin("k", held)

        async def cycle_then_status() -> str:
            await c.cycle()
            return (await c.statuses())[held]

        await wait_for(cycle_then_status, lambda s: s == "retired", what="retired by RunOnce")
        assert await c.holders("k") == {other}


async def test_an_amm_restarted_mid_retirement_resumes_it(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"  # back at the same address, as its agents expect
    config = amm_config(tmp_path, measure="managed", interval="50ms", listen=listen)
    async with AsyncExitStack() as stack:
        first = AmmServer(config)
        await first.start()
        stack.push_async_callback(first.stop)
        agents = [
            await stack.enter_async_context(running_agent(amm=first.address, lease=0.3))
            for _ in range(2)
        ]
        held, other = (a.address for a in agents)
        async with AsyncClient(first.address, timeout=10) as client:
            await wait_for(client.workers, lambda ws: len(ws) == 2, what="agents registered")
            await client.put("k", DATA, workers=[held])
            await client.pin("k", held)  # holds the retirement up
            retire = asyncio.ensure_future(client.retire_workers([held], close=True))
            await wait_for(lambda: client.who_has("k"), lambda wh: set(wh["k"]) == {held, other})
            await first.stop()
            with pytest.raises(AmmError) as err:
                await retire
            assert err.value.status == grpc.StatusCode.UNAVAILABLE

        second = await stack.enter_async_context(AmmServer(config))
        async with AsyncClient(second.address, timeout=10) as client:
            statuses = {w.address: w.status for w in await client.workers()}
            assert statuses == {held: "retiring", other: "running"}
            await client.unpin("k", held)

            async def cycle_then_stopped() -> bool:
                await client.amm.run_once()
                return agents[0].stopped.is_set()

            await wait_for(cycle_then_stopped, what="the retired agent closed")
            assert [w.address for w in await client.workers(fresh=True)] == [other]
            assert await client.get("k") == DATA
            assert second.manager is not None
            retired = second.manager.events.of_kind("retired")
            assert [e.worker for e in retired] == [held]
            assert "its agent is shutting down" in retired[0].message


async def test_pause_to_retire_retires_a_worker_paused_too_long(tmp_path: Path) -> None:
    policies = [
        {"class": "ReduceReplicas"},
        {"class": "RetireWorker"},
        {"class": "PauseToRetire", "timeout": "200ms"},
    ]
    async with cluster(tmp_path, 2, agent_options=[PAUSED_ALWAYS], policies=policies) as c:
        paused, other = c.addresses
        await c.client.put("k", DATA, workers=[paused])
        assert (await c.statuses())[paused] == "paused"

        async def cycle_then_stopped() -> bool:
            await c.cycle()
            return c.agents[0].stopped.is_set()

        await wait_for(cycle_then_stopped, what="the paused worker retired and closed")
        assert await c.holders("k") == {other}
        events = [(kind, worker) for kind, worker, _ in await c.events()]
        assert events[:3] == [
            ("retired", paused),
            ("retire-started", paused),
            ("pause-to-retire", paused),
        ]
        message = next(m for kind, _, m in await c.events() if kind == "pause-to-retire")
        assert "longer than 0.2 s" in message


async def test_pause_to_retire_declines_the_last_running_worker_once(tmp_path: Path) -> None:
    policies = [{"class": "RetireWorker"}, {"class": "PauseToRetire", "timeout": "100ms"}]
    async with cluster(tmp_path, 1, agent_options=[PAUSED_ALWAYS], policies=policies) as c:

        async def cycle_then_events() -> list[tuple[str, str, str]]:
            await c.cycle()
            return await c.events()

        events = await wait_for(cycle_then_events, what="a pause-to-retire decision")
        for _ in range(3):
            await c.cycle()
        assert await c.events() == events
        ((kind, worker, message),) = events
        assert (kind, worker) == ("pause-to-retire-declined", c.addresses[0])
        assert message.endswith("not retired: it is the last running worker")
        assert (await c.statuses())[worker] == "paused"


async def test_retiring_every_worker_at_once_retires_all_but_one_holder_of_a_shared_key(
    tmp_path: Path,
) -> None:
    """Nowhere to move x: one holder keeps it and the other retires, as in Dask. Before, both
    retirements were abandoned in the same cycle and neither worker retired."""
    async with cluster(tmp_path, 2) as c:
        await c.client.put("x", DATA, workers=c.addresses)
        results = await c.client.retire_workers(c.addresses, close=False, timeout=10)
        assert sorted(r.retired for r in results) == [False, True]
        (kept,) = [r.worker for r in results if not r.retired]
        assert await c.holders("x") == {kept}
        statuses = await c.statuses()
        assert sorted(statuses.values()) == ["retired", "running"]


async def test_a_paused_readers_worker_does_not_take_the_running_holders_copy(
    tmp_path: Path,
) -> None:
    """x is pinned on a paused worker and held by a running one too: Dask drops neither. Before,
    the running worker's copy was dropped and x was left only on the paused worker."""
    async with cluster(tmp_path, 2, agent_options=[PAUSED_ALWAYS]) as c:
        paused, running = c.addresses
        await c.client.put("x", DATA, workers=[paused, running])
        await c.client.pin("x", paused)
        assert (await c.statuses())[paused] == "paused"
        for _ in range(2):
            report = await c.client.amm.run_once()
            assert report.directives == ()
        assert await c.holders("x") == {paused, running}
        (rejection,) = report.rejections
        assert "paused or leaving" in rejection.reason
        # Once the reader is done, the extra copy goes (from the paused worker, first).
        await c.client.unpin("x", paused)
        await c.client.amm.run_once()
        assert await c.holders("x") == {running}


async def test_agent_close_refuses_while_it_holds_keys_unless_forced() -> None:
    async with running_agent() as agent, dial(agent.address) as stub:
        await put(stub, "k", DATA)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Close(agent_pb2.CloseRequest(reason="test"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds 1 key(s)" in (info.value.details() or "")
        assert not agent.node.closing
        reply = await stub.Close(agent_pb2.CloseRequest(reason="test", force=True))
        assert reply.closing
        await asyncio.wait_for(agent.stopped.wait(), 5)


def test_amm_retire_closes_a_real_agent_process_which_exits_cleanly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with local_cluster(2, interval=0.05) as c, Client(c.address, timeout=10) as client:
        leaving, staying = c.workers
        client.put("k", DATA, workers=[leaving])
        assert cli_main(["--amm", c.address, "retire", leaving, "--json"]) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result == {
            "worker": leaving,
            "retired": True,
            "reason": result["reason"],
            "closed": True,
        }
        assert poll_until(c.exited, what="the agent process exited") == {"worker-0": 0}
        assert c.workers == [staying], "a closed agent is no running worker of the cluster"
        assert client.who_has("k") == {"k": (staying,)}
        assert client.get("k") == DATA
        assert cli_main(["--amm", c.address, "retire", "-n", "1", "--no-close"]) == 1
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == ["WORKER", "RETIRED", "CLOSED", "REASON"]
        assert f"{staying}  no " in out


async def test_a_caller_still_waiting_when_the_amm_is_stopped_gets_its_result(
    tmp_path: Path,
) -> None:
    """Stopping the AMM must not strand a RetireWorkers call begun while it ran: the call runs
    cycles itself, as it does when it begins on a stopped AMM."""
    async with cluster(tmp_path, 2, start=True) as c:
        held, other = c.addresses
        await c.client.put("k", DATA, workers=[held])
        await c.client.pin("k", held)  # holds the retirement up until the AMM is stopped
        retire = asyncio.ensure_future(c.client.retire_workers([held], close=False))
        await wait_for(c.statuses, lambda s: s[held] == "retiring", what="retiring")
        await c.client.amm.stop()
        await c.client.unpin("k", held)
        (result,) = await asyncio.wait_for(retire, 5)
        assert (result.worker, result.retired) == (held, True)
        assert await c.holders("k") == {other}
        assert not await c.client.amm.running()


async def test_the_client_answers_bad_retire_arguments_with_invalid_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with cluster(tmp_path, 1) as c:
        (worker,) = c.addresses
        bad: list[dict[str, Any]] = [
            {"n": -1},
            {"n": 2**32},
            {"workers": [worker], "timeout": math.inf},
            {"workers": [worker], "timeout": math.nan},
            {"workers": [worker], "timeout": 1e300},
        ]
        for kwargs in bad:
            with pytest.raises(AmmError) as err:
                await c.client.retire_workers(**kwargs)
            assert err.value.status == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert (await c.statuses())[worker] == "running"
        # A timeout longer than gRPC can express as a deadline leaves the call without one.
        (result,) = await c.client.retire_workers(worker, close=False, timeout=1e11)
        assert (result.worker, result.retired) == (worker, True)
    assert cli_main(["--amm", "127.0.0.1:1", "retire", "-n", "-1"]) == 1
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: n out of range: -1\n"


async def test_a_retirement_moves_on_as_its_transfers_complete_not_an_interval_later(
    tmp_path: Path,
) -> None:
    """With a 30 s interval, a clock-paced AMM would need two intervals (copy, then drop) to
    retire a worker; following up on applied work, it needs a fraction of one."""
    async with cluster(tmp_path, 3, start=True, interval="30s") as c:
        retiring = c.addresses[0]
        for i in range(6):
            await c.client.put(f"k{i}", DATA, workers=[retiring])
        (result,) = await asyncio.wait_for(
            c.client.retire_workers([retiring], close=False), timeout=20
        )
        assert result.retired, result.reason
        assert (await c.client.has_what(retiring))[retiring] == ()
        for i in range(6):
            assert len(await c.holders(f"k{i}")) == 1


async def test_a_retirement_ends_on_the_agents_answers_without_another_cycle(
    tmp_path: Path,
) -> None:
    """The copies' outcomes release the retiring worker's keys and the drops' outcomes end the
    retirement: it takes the one cycle that starts the copies, and no later one. Cycles alone
    take three (copy; drop once a poll shows the copies; retire once a poll shows it empty),
    here 30 s apart: a 10-minute interval follows up on applied work after a twentieth of it."""
    async with cluster(tmp_path, 3, start=True, interval="10m") as c:
        manager = c.amm.manager
        assert manager is not None
        retiring = c.addresses[0]
        keys = [f"k{i}" for i in range(6)]
        for key in keys:
            await c.client.put(key, DATA, workers=[retiring])
        before = manager.cycles
        (result,) = await asyncio.wait_for(
            c.client.retire_workers([retiring], close=False), timeout=20
        )
        assert result.retired, result.reason
        assert manager.cycles == before + 1
        placement = await c.client.who_has(keys, fresh=True)
        for key in keys:
            (holder,) = placement[key]
            assert holder != retiring
            assert await c.client.get(key, worker=holder) == DATA
        assert (await c.client.has_what(retiring))[retiring] == ()


async def test_copies_held_back_for_a_transfer_slot_start_as_soon_as_one_frees(
    tmp_path: Path,
) -> None:
    """One incoming transfer per worker: two of six copies start in the first cycle, and each
    ending copy starts the next cycle at once. Batches a follow-up apart (30 s with a 10-minute
    interval) would need a minute."""
    async with cluster(tmp_path, 3, start=True, interval="10m", max_incoming_transfers=1) as c:
        retiring = c.addresses[0]
        keys = [f"k{i}" for i in range(6)]
        for key in keys:
            await c.client.put(key, DATA, workers=[retiring])
        (result,) = await asyncio.wait_for(
            c.client.retire_workers([retiring], close=False), timeout=20
        )
        assert result.retired, result.reason
        placement = await c.client.who_has(keys, fresh=True)
        assert all(len(placement[key]) == 1 and retiring not in placement[key] for key in keys)
