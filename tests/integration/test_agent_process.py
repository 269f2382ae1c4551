"""The agent as a real process: ready line, SIGTERM, exit code."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time

from amm.v1 import agent_pb2
from tests.support.agent import dial

READY = "amm-agent ready address="


def unused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_agent_process_prints_ready_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker_agent",
        "--listen",
        "127.0.0.1:0",
        "--amm",
        unused_address(),
        "--name",
        "proc",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith(READY), line
        address = line.strip().removeprefix(READY)
        async with dial(address) as stub:
            inventory = await stub.Poll(agent_pb2.PollRequest())
        assert inventory.name == "proc"

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 5)
        elapsed = time.monotonic() - started
        stderr = (await process.stderr.read()).decode()
        assert code == 0, stderr
        assert elapsed < 1.0, f"took {elapsed:.2f}s to stop"
        assert "Traceback" not in stderr
        assert (await process.stdout.read()) == b"", "exactly one line on stdout"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
