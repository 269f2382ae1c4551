"""``amm replay`` on real local clusters: a tiny synthetic trace, replayed in seconds.

The trace has three workers. Three roots; two tasks that each read two roots from peers; a late
task that reads a root long after its other readers finished (so a running AMM has cycles in
which to drop one of that root's two idle replicas); and an output that reads the rest.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import re
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm import demo
from amm.cli import main as cli_main
from amm.client import AsyncClient, Client
from amm.cluster import LocalCluster
from amm.errors import AmmError
from amm.replay import runner
from amm.replay.command import ReplayOptions, begin_replay, run_modes, run_replay
from amm.replay.command import local_cluster as local_cluster_for
from amm.replay.plan import Scale, make_plan
from amm.replay.report import HONESTY_NOTE
from amm.replay.runner import Forgetter, Replayer, ReplayError, forget_prefix
from amm.replay.trace import TRACE_FORMAT, parse_trace
from amm.v1 import agent_pb2
from tests.support.agent import dial
from tests.support.processes import local_cluster
from tests.support.waiting import wait_for

PLOTTING = all(importlib.util.find_spec(m) for m in ("matplotlib", "pandas"))
ROOT = 200_000
MIDDLE = 100_000
# Inputs read from another worker than their producer's, each (key, worker) once, AMM off:
# r0 and r1 to w2, r1 and r2 to w0, r0 to w1 (late), m01 and m12 to w1 (out).
TRANSFERRED = 5 * ROOT + 2 * MIDDLE


def task(
    key: str, worker: int, start: float, stop: float, inputs: list[str], nbytes: int
) -> dict[str, Any]:
    return {
        "key": key,
        "worker": str(worker),
        "queued": start,
        "start": start,
        "stop": stop,
        "inputs": inputs,
        "nbytes": nbytes,
    }


DOCUMENT = {
    "format": TRACE_FORMAT,
    "meta": {"workload": "synthetic"},
    "outputs": ["out"],
    "tasks": [
        task("r0", 0, 0.0, 0.05, [], ROOT),
        task("r1", 1, 0.0, 0.05, [], ROOT),
        task("r2", 2, 0.0, 0.05, [], ROOT),
        task("m01", 2, 0.1, 0.2, ["r0", "r1"], MIDDLE),
        task("m12", 0, 0.1, 0.2, ["r1", "r2"], MIDDLE),
        task("late", 1, 1.8, 1.85, ["r0"], 10),
        task("out", 1, 1.9, 1.95, ["m01", "m12", "late"], 8),
    ],
}


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(DOCUMENT))
    return path


def test_replay_off_then_on_reports_moves_and_leaves_nothing(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ReplayOptions(
        trace=trace_file,
        modes=(False, True),
        interval=0.2,
        progress=False,
        json=tmp_path / "out.json",
        plot=tmp_path / "memory.png" if PLOTTING else None,
    )
    outcome = run_replay(options)
    assert outcome.ok
    off, on = outcome.runs
    assert (off.label, on.label) == ("AMM off", "AMM on")
    assert off.bytes_transferred == TRANSFERRED
    assert off.replicas_dropped == 0
    assert off.bytes_put == 3 * ROOT + 2 * MIDDLE + 10 + 8
    # r0's two idle replicas (w0, w2) wait 1.6 s for their last reader: the AMM drops one.
    assert on.replicas_dropped >= 1
    assert off.peak_managed >= 3 * ROOT
    assert off.start_process > 0
    out = capsys.readouterr().out
    assert out.startswith(HONESTY_NOTE)
    check = next(line for line in out.splitlines() if line.startswith("end-state check"))
    assert check.split()[-2:] == ["ok", "ok"]
    document = json.loads((tmp_path / "out.json").read_text())
    assert document["ratios"]["bytes_transferred"] == on.bytes_transferred / TRANSFERRED
    assert set(document["samples"]) == {"AMM off", "AMM on"}
    if PLOTTING:
        assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_says_where_its_trace_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--trace", str(tmp_path / "gone.json.gz")]) == 1
    assert "demo failed: no trace at" in capsys.readouterr().err
    assert demo.TRACE.exists()


def test_the_demo_runs_off_then_on_on_one_cluster_whose_dashboard_charts_both(
    trace_file: Path,
) -> None:
    """``python -m amm.demo``'s way: one AMM with its dashboard, stopped for the first run and
    started for the second, the agents restarted in between under the same names and
    addresses; the dashboard's history holds both runs, the AMM-off one marked so."""
    options = ReplayOptions(trace=trace_file, modes=(False, True), interval=0.2, progress=False)
    outcome = begin_replay(options, io.StringIO())
    with local_cluster_for(options, outcome.trace, dashboard="127.0.0.1:0") as cluster:
        assert cluster.dashboard is not None
        before = cluster.worker_pids
        run_modes(options, outcome, cluster=cluster)
        assert outcome.ok
        off, on = outcome.runs
        assert off.replicas_dropped == 0
        assert on.replicas_dropped >= 1
        after = cluster.worker_pids
        assert set(after) == set(before), "the same addresses"
        assert not set(after.values()) & set(before.values()), "fresh processes"
        url = f"http://{cluster.dashboard}/api/history?after=0"
        with urllib.request.urlopen(url, timeout=10) as response:
            samples = json.load(response)["samples"]
    running = [s["running"] for s in samples]
    assert False in running
    assert True in running
    assert running.index(False) < running.index(True), "AMM off first"
    names = {w[0] for s in samples for w in s["workers"]}
    assert names == {"worker-0", "worker-1", "worker-2"}, "the same workers all along"
    assert "the agents were restarted between them" in outcome.shared


def test_the_demo_prints_its_dashboard_first(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--trace", str(trace_file), "--no-progress", "--dashboard", "127.0.0.1:0"]
    assert demo.main([*argv, "--plot", str(tmp_path / "memory.png")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == HONESTY_NOTE
    dashboard = next(line for line in lines if line.startswith("Dashboard: "))
    assert re.match(r"Dashboard: http://127\.0\.0\.1:\d+/  \(open it now", dashboard)
    assert lines.index(dashboard) < next(
        i for i, line in enumerate(lines) if line.startswith("peak cluster memory")
    )
    assert "The demo took" in out


async def test_the_end_check_catches_a_missing_and_an_unexpected_key(trace_file: Path) -> None:
    plan = make_plan(parse_trace(DOCUMENT), 3, Scale(time=0.2), "check")
    with local_cluster(3) as cluster:
        async with AsyncClient(cluster.address) as client:
            replayer = Replayer(client, plan, cluster.workers)
            await replayer.play()
            check, held = await replayer.check_end()
            assert check.ok
            assert set(held) == {"check/out"}
            await client.forget(["check/out"])
            await client.put("check/stray", b"x", workers=[cluster.workers[0]])
            await client.put("not-ours", b"y", workers=[cluster.workers[0]])
            check, held = await replayer.check_end()
            assert check.missing == {"check/out"}
            assert check.extra == {"check/stray"}
            assert "1 missing: check/out; 1 unexpected: check/stray" in check.describe()
            await replayer.cleanup(list(held))
            assert set(await client.who_has(fresh=True)) == {"not-ours"}


async def test_a_failed_step_is_named(trace_file: Path) -> None:
    plan = make_plan(parse_trace(DOCUMENT), 3, Scale(time=0.1), "small")
    with LocalCluster(3, start=False, agent_args=["--memory-limit", "100KB"]) as cluster:
        async with AsyncClient(cluster.address) as client:
            with pytest.raises(
                ReplayError, match=r"step .r\d. on 127\.0\.0\.1:\d+: RESOURCE_EXHAUSTED"
            ):
                await Replayer(client, plan, cluster.workers).run()


def test_replay_on_a_running_amm_restores_its_state(trace_file: Path, tmp_path: Path) -> None:
    with local_cluster(2, interval=0.2) as cluster:
        options = ReplayOptions(
            trace=trace_file,
            modes=(True,),
            address=cluster.address,
            progress=False,
            time_scale=0.5,
        )
        outcome = run_replay(options)
        assert outcome.ok
        assert outcome.plan.workers == 2
        with Client(cluster.address) as client:
            assert client.amm.running() is False
            assert client.who_has(fresh=True) == {}


def test_a_failed_replay_on_a_running_amm_leaves_no_pin_and_no_key(
    trace_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each agent holds its root and one more, not two (and never pauses: its process is far
    # above such a limit): a middle task pins one of its inputs, then cannot keep the other
    # (no room for a replica), waits in vain for room, and the replay fails with a pin held.
    monkeypatch.setattr(runner, "PIN_PATIENCE", 1.0)
    limit = str(2 * ROOT + ROOT // 4)
    agent_args = ["--memory-limit", limit, "--pause-fraction", "never"]
    with local_cluster(3, agent_args=agent_args) as cluster:
        options = ReplayOptions(trace=trace_file, modes=(False,), address=cluster.address)
        with pytest.raises(ReplayError, match="could not pin"):
            run_replay(replace(options, progress=False, time_scale=0.5))
        with Client(cluster.address) as client:
            assert client.who_has(fresh=True) == {}


def test_the_cli_says_what_is_wrong_with_a_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DOCUMENT, "outputs": ["missing"]}))
    assert cli_main(["replay", str(bad), "--no-progress"]) == 1
    assert capsys.readouterr().err == "error: output 'missing' is not a task of the trace\n"
    assert cli_main(["replay", str(tmp_path / "nope.json")]) == 1
    assert "error: cannot read" in capsys.readouterr().err


def test_a_replay_needs_the_agents_it_asks_for(trace_file: Path) -> None:
    with local_cluster(1) as cluster:
        options = ReplayOptions(
            trace=trace_file, workers=2, address=cluster.address, progress=False
        )
        with pytest.raises(ReplayError, match=r"--workers 2: the AMM at .* has 1 running agents"):
            run_replay(options)


def test_prefetch_reads_through_a_worker_without_downloading() -> None:
    with local_cluster(2) as cluster, Client(cluster.address) as client:
        w1, w2 = cluster.workers
        client.put("pf", b"z" * 50_000, workers=[w1])
        got = client.prefetch("pf", w2, sources=[w1])
        assert (got.size, got.fetched) == (50_000, True)
        assert client.who_has("pf")["pf"] == tuple(sorted([w1, w2]))
        assert client.prefetch("pf", w2).fetched is False
        with pytest.raises(AmmError) as missing:
            client.prefetch("nope", w2)
        assert missing.value.status == grpc.StatusCode.NOT_FOUND


async def test_forgetting_skips_keys_already_gone_and_a_prefix_stays_its_own() -> None:
    with local_cluster(1) as cluster:
        (worker,) = cluster.workers
        async with AsyncClient(cluster.address) as client:
            for key in ("pre/x", "pre/y", "pre/z", "prefix-other"):
                await client.put(key, b"v", workers=[worker])
            forgetter = Forgetter(client)
            # One Forget fails as a whole on an unknown key: the forgetter goes key by key.
            await forgetter.forget(["pre/x", "gone"])
            assert forgetter.deleted == 1
            assert await forget_prefix(client, "pre") == 2
            assert set(await client.who_has(fresh=True)) == {"prefix-other"}


async def pinned_keys(workers: list[str]) -> list[tuple[str, str]]:
    """(worker, key) of every pinned key, as the agents themselves report them."""
    found = []
    for worker in workers:
        async with dial(worker) as stub:
            reply = await stub.Poll(agent_pb2.PollRequest())
        found += [(worker, k.key) for k in reply.keys if k.pinned]
    return found


async def test_a_replay_cancelled_mid_run_releases_its_pins(trace_file: Path) -> None:
    """Ctrl-C cancels the replay: what its queued steps pinned is released, so that its keys
    can be forgotten (``amm forget`` refuses pinned keys)."""
    plan = make_plan(parse_trace(DOCUMENT), 3, Scale(time=1.0), "cancelled")
    with local_cluster(3) as cluster:
        async with AsyncClient(cluster.address) as client:
            replay = asyncio.create_task(Replayer(client, plan, cluster.workers).run())
            await wait_for(lambda: pinned_keys(cluster.workers), what="a step holding pins")
            replay.cancel()
            with pytest.raises(asyncio.CancelledError):
                await replay
            assert await pinned_keys(cluster.workers) == []
            assert await forget_prefix(client, "cancelled") > 0
