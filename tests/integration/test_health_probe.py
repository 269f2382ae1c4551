"""``amm health``, the probe the compose health checks run, as a real process against real
servers: its exit code is what Docker reads."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import running_agent


async def probe(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amm",
        "health",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode().strip()


async def test_serving_servers_pass(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm, running_agent() as agent:
        assert await probe(amm.address) == (0, "SERVING", "")
        assert await probe(amm.address, "--service", "amm.v1.ActiveMemoryManager") == (
            0,
            "SERVING",
            "",
        )
        assert await probe(agent.address, "--service", "amm.v1.WorkerAgent") == (0, "SERVING", "")


async def test_a_stopping_server_fails(tmp_path: Path) -> None:
    """Servers report NOT_SERVING from the moment they begin to stop (``Served.set_serving``)."""
    async with running_agent() as agent:
        assert agent._served is not None
        await agent._served.set_serving(False)
        assert await probe(agent.address) == (1, "NOT_SERVING", "")


async def test_no_server_or_an_unknown_service_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        code, out, err = await probe(f"127.0.0.1:{port}", "--timeout", "2")
    assert (code, out) == (1, "")
    assert err.startswith("error: UNAVAILABLE: health of the server at 127.0.0.1:")
    assert len(err.splitlines()) == 1
    async with AmmServer(amm_config(tmp_path)) as amm:
        code, out, err = await probe(amm.address, "--service", "nope")
        assert (code, out) == (1, "")
        assert err.startswith("error: NOT_FOUND: health of service 'nope' at ")
