"""Metrics of real processes: an AMM and two agents started with --metrics-listen, each naming
its metrics port on its ready line, scraped over HTTP while the AMM drops replicas, and gone
once SIGTERM stopped them. Also: the text passes ``promtool check metrics`` where promtool is
installed (the Debian ``prometheus`` package ships it)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from amm import AsyncClient
from tests.integration.test_metrics import cluster
from tests.support.metrics import Scrape, scrape
from tests.support.waiting import wait_for

LOOPBACK = "127.0.0.1:0"


@asynccontextmanager
async def process(module: str, *args: str) -> AsyncIterator[dict[str, str]]:
    """A ``python -m module`` process; its ready line's fields. SIGTERM on exit, exit 0."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stderr is not None
        line = (await asyncio.wait_for(child.stdout.readline(), 20)).decode()
        assert " ready " in line, line or (await child.stderr.read()).decode()
        yield dict(token.split("=", 1) for token in line.split() if "=" in token)
        child.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(child.wait(), 10)
        stderr = (await child.stderr.read()).decode()
        assert code == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def scraped(address: str) -> Scrape:
    return await asyncio.to_thread(scrape, address)


async def test_processes_serve_metrics_that_follow_the_cluster() -> None:
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(
            process(
                "amm_service",
                *("--listen", LOOPBACK, "--state", ":memory:", "--interval", "200ms"),
                *("--metrics-listen", LOOPBACK),
            )
        )
        agents = [
            await stack.enter_async_context(
                process(
                    "worker_agent",
                    *("--amm", amm["address"], "--listen", LOOPBACK),
                    *("--metrics-listen", LOOPBACK, "--name", f"w{i}"),
                )
            )
            for i in range(2)
        ]
        client = await stack.enter_async_context(AsyncClient(amm["address"], timeout=10))
        await wait_for(client.workers, lambda ws: len(ws) == 2, what="both agents registered")
        values = {f"k{i}": bytes(100) for i in range(20)}
        await client.put_many(values, workers=[a["address"] for a in agents])
        report = await client.amm.run_once(wait=True)
        assert report.applied == 20

        await client.workers(fresh=True)  # a stopped AMM polls only when asked
        got = await scraped(amm["metrics"])
        assert got.value("amm_replicas") == 20
        assert got.value("amm_keys") == 20
        assert got.value("amm_unique_bytes") == 2000
        assert got.value("amm_directives_sent_total", op="drop") == 20
        assert got.value("amm_directive_outcomes_total", op="drop", outcome="applied") == 20
        assert got.value("amm_rpc_duration_seconds_count", method="RunOnce", code="OK") == 1
        assert got.value("amm_rpc_duration_seconds_count", method="RegisterWorker") >= 2
        assert got.value("process_resident_memory_bytes") > 0
        on_agents = [await scraped(a["metrics"]) for a in agents]
        assert sum(s.value("amm_agent_keys") for s in on_agents) == 20
        assert [s.value("amm_agent_received_bytes_total", via="put_many") for s in on_agents] == [
            2000,
            2000,
        ]
        drops = [
            s.value("amm_agent_directives_total", op="drop", outcome="applied") for s in on_agents
        ]
        assert sum(drops) == 20
        promises = [
            s.value("amm_agent_rpc_duration_seconds_count", method="PromiseKeepBatch")
            for s in on_agents
        ]
        assert sum(promises) >= 1
        addresses = [amm["metrics"], *(a["metrics"] for a in agents)]
    for address in addresses:
        with pytest.raises(urllib.error.URLError):
            await scraped(address)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_the_exposition_passes_promtool(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        manager = c.amm.manager
        assert manager is not None
        await manager.run_cycle(wait=True)
        texts = [(await c.scrape_amm()).text, *(s.text for s in await c.scrape_agents())]
    for text in texts:
        checked = await asyncio.to_thread(
            subprocess.run,
            ["promtool", "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_process_whose_metrics_port_is_taken_exits_and_says_why() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for module, code in (("amm_service", 2), ("worker_agent", 1)):
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *("--listen", LOOPBACK, "--metrics-listen", busy),
                *(("--state", ":memory:") if module == "amm_service" else ()),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(child.communicate(), 20)
            assert child.returncode == code, err.decode()
            assert out == b""
            assert f"cannot serve metrics on {busy}: " in err.decode()
            assert "Traceback" not in err.decode()
