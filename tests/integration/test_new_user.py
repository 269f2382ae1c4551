"""What a new user hits first, fresh clone and README in hand: the README's own example on the
README's own cluster, one-liners at the prompt, piping the CLI into ``head``, Ctrl-C in the demo.
Real processes throughout (a ``LocalCluster`` of 4 agents, as ``amm cluster --workers 4``).
"""

from __future__ import annotations

import gc
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from amm.cli import main as cli_main
from amm.client import AsyncClient, Client
from amm.cluster import LocalCluster
from amm.tables import render_workers
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.integration.test_amm_liveness import restarted
from tests.integration.test_goals import DATA, goals_cluster
from tests.support.agent import put, running_agent
from tests.support.processes import local_cluster
from tests.support.waiting import poll_until, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(4) as running:
        yield running


def readme_block(heading: str) -> str:
    """The first fenced code block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(heading) :]
    found = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert found is not None, f"no python block after {heading!r}"
    return found.group(1)


def test_the_readme_example_runs_on_the_readme_cluster(cluster: LocalCluster) -> None:
    """``amm cluster --workers 4``, then the example as printed (it once unpacked two)."""
    code = readme_block("## The example").replace('"127.0.0.1:50051"', repr(cluster.address))
    scope: dict[str, object] = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        client = scope.get("client")
        if isinstance(client, Client):
            client.amm.stop()
            client.forget("x")
            client.close()


def test_a_fresh_cluster_shows_each_workers_status_and_memory_before_any_cycle() -> None:
    with local_cluster(2) as fresh, Client(fresh.address) as client:
        assert client.status().cycles == 0
        workers = client.workers()
        assert [w.status for w in workers] == ["running", "running"]
        assert all(w.process_bytes > 0 and w.last_poll is not None for w in workers), workers
        table = render_workers(workers)
        assert "unspecified" not in table
        assert "never" not in table


def test_the_amm_proxy_keeps_a_temporary_client_alive(cluster: LocalCluster) -> None:
    Client(cluster.address).amm.stop()  # the client is garbage once .amm is looked up
    control = Client(cluster.address).amm
    gc.collect()
    assert control.running() is False


def test_an_uncaught_client_error_prints_its_one_line_not_a_chain(
    cluster: LocalCluster,
) -> None:
    script = (
        "from amm import Client\n"
        f"Client({cluster.address!r}).get('no-such-key', worker='127.0.0.1:1')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("amm.errors.AmmError: UNAVAILABLE: worker at 127.0.0.1:1"), lines
    assert "The above exception" not in done.stderr
    assert len(lines) <= 6, done.stderr  # the caller's frame, the call, and the one line


def test_the_cli_piped_into_a_reader_that_stops_early_exits_quietly(
    cluster: LocalCluster,
) -> None:
    """``amm status --json | head``: the reader is gone before the first write."""
    argv = [sys.executable, "-m", "amm", "--amm", cluster.address, "status", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


def agents_hold_keys(pid: int) -> bool:
    """Whether any agent process under ``pid`` holds a key: the demo's replay is under way."""
    for child in psutil.Process(pid).children():
        if "worker_agent" not in child.cmdline():
            continue
        for conn in child.net_connections("tcp"):
            if conn.status != psutil.CONN_LISTEN:
                continue
            with grpc.insecure_channel(f"127.0.0.1:{conn.laddr.port}") as channel:
                stub = agent_pb2_grpc.WorkerAgentStub(channel)
                try:
                    if stub.Poll(agent_pb2.PollRequest(), timeout=5).keys:
                        return True
                except grpc.RpcError as err:
                    # An agent's bulk port speaks no gRPC: it drops the connection.
                    if err.code() is not grpc.StatusCode.UNAVAILABLE:
                        raise
    return False


@pytest.mark.parametrize("when", ["starting", "replaying"])
def test_ctrl_c_in_the_demo_prints_one_line_and_leaves_nothing_running(when: str) -> None:
    argv = [sys.executable, "-m", "amm.demo", "--no-progress", "--byte-scale", "0.001"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    children: list[psutil.Process] = []
    try:
        for line in proc.stdout:  # the honesty note first, then the cluster starts
            if line.startswith("This is a replay"):
                break
        if when == "replaying":
            poll_until(lambda: agents_hold_keys(proc.pid), 60, "the replay started", 0.2)
        children = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip() == "demo interrupted; its cluster is stopped"
    # Stopped by the demo, or, for one started as the interrupt came (its Popen cut short, so
    # nobody knew it), by its lifeline: it stops by itself once the demo is gone.
    poll_until(lambda: not [c for c in children if running(c)], 20, "the demo's processes exited")


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_goals_count_the_copies_who_has_shows(tmp_path: Path) -> None:
    """``amm goals`` right after a copy was made agrees with ``amm who-has``: both poll first."""
    async with goals_cluster(tmp_path, 2) as c:
        await put(c.stubs[0], "x", DATA)
        await c.replicate(["x"], 2)
        report = await c.run_once()  # its poll came before the copy it made
        assert report.applied == 1
        assert len(await c.holders("x")) == 2
        fresh = await c.control.ListGoals(control_pb2.ListGoalsRequest(keys=["x"], fresh=True))
        assert fresh.goals[0].live_copies == 2
        async with AsyncClient(c.amm.address) as client:
            (goal,) = await client.goals("x")
        assert goal.live_copies == 2


async def test_an_amm_restarted_in_the_same_directory_leaves_the_dead_workers_of_its_last_run_out(
    tmp_path: Path,
) -> None:
    """The workers of the previous run that have not shown up are not listed as live."""
    async with restarted(tmp_path) as r, AsyncClient(r.amm.address) as client:
        live = sorted(agent.address for agent in r.holders)
        assert sorted(await client.has_what()) == live
        workers = {w.address: w for w in await client.workers()}
        assert workers[r.gone].unconfirmed
        assert not any(workers[address].unconfirmed for address in live)
        assert "unconfirmed" in render_workers([workers[r.gone]])
        assert await client.has_what(r.gone) == {r.gone: ()}  # asked for by address: listed
        # Once it shows up again it is a worker like any other.
        async with running_agent(amm=r.amm.address, listen=r.gone) as back:
            await wait_for(lambda: back.registered, what="re-registration")
            assert sorted(await client.has_what()) == sorted([*live, r.gone])


async def amm_call(amm: AmmServer, verb: str) -> None:
    async with AsyncClient(amm.address) as client:
        await (client.amm.start() if verb == "start" else client.amm.stop())


async def test_stop_survives_a_restart_of_an_amm_set_to_start_from_boot(tmp_path: Path) -> None:
    """As under compose (AMM_START=true): an operator's Stop, then Start, persist and win."""

    async def running_after_boot(start: bool) -> bool:
        async with AmmServer(amm_config(tmp_path, start=start)) as amm:
            assert amm.manager is not None
            return amm.manager.running

    assert await running_after_boot(True)  # nothing chosen yet: the setting decides
    async with AmmServer(amm_config(tmp_path, start=True)) as amm:
        await amm_call(amm, "stop")
    assert not await running_after_boot(True)
    async with AmmServer(amm_config(tmp_path, start=True)) as amm:
        await amm_call(amm, "start")
    assert await running_after_boot(False)


def test_amm_unpin_frees_the_pins_of_a_client_that_died_so_forget_can_delete(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    amm = ["--amm", cluster.address]
    w1, w2 = cluster.workers[:2]
    with Client(cluster.address) as client:
        client.put("pinned", b"v", workers=[w1, w2])
        for _ in range(3):
            client.pin("pinned", w1)  # a client that dies holding them
        client.pin("pinned", w2)
    assert cli_main([*amm, "forget", "pinned"]) == 1
    assert "amm unpin --all KEY" in capsys.readouterr().err
    assert cli_main([*amm, "unpin", "pinned", "--worker", w1]) == 0
    assert capsys.readouterr().out.split("\n")[1].split()[-2:] == ["1", "2"]
    assert cli_main([*amm, "unpin", "pinned", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"key": "pinned", "worker": w, "released": n, "pins": 0}
        for w, n in sorted([(w1, 2), (w2, 1)])
    ]
    assert cli_main([*amm, "unpin", "pinned", "--all"]) == 0  # nothing left: nothing released
    assert cli_main([*amm, "forget", "pinned"]) == 0
    assert "deleted 2 replica(s)" in capsys.readouterr().out
