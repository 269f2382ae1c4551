"""The AMM as a real process: ready line, config errors, SIGTERM with agents attached."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from amm import AsyncClient

READY = "amm-service ready address="


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amm_service",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_service_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = str(tmp_path / "state.sqlite3")
    process = await start("--listen", "127.0.0.1:0", "--state", state, "--interval", "100ms")
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith(READY), line
        address = line.split()[2].removeprefix("address=")
        first = int(line.split()[3].removeprefix("epoch="))
        assert first >= 1
        async with AsyncClient(address, timeout=5) as client:
            await client.amm.start()
            assert await client.amm.running()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 5)
        stderr = (await process.stderr.read()).decode()
        assert code == 0, stderr
        assert time.monotonic() - started < 2.0
        assert "Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Restarted on the same state file: a new epoch, and still running.
    again = await start("--listen", "127.0.0.1:0", "--state", state)
    try:
        assert again.stdout is not None
        line = (await asyncio.wait_for(again.stdout.readline(), 20)).decode()
        assert int(line.split()[3].removeprefix("epoch=")) > first
        async with AsyncClient(line.split()[2].removeprefix("address="), timeout=5) as client:
            assert await client.amm.running()
    finally:
        again.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.wait(), 5) == 0


async def test_invalid_configuration_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    process = await start("--listen", "127.0.0.1:0", "--measure", "rss")
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert err.decode().strip() == (
        "amm service: error: invalid measure 'rss' (from --measure): "
        "choose one of managed, optimistic, process"
    )
    config = tmp_path / "amm.yaml"
    config.write_text("policies:\n  - class: nope.Policy\n")
    process = await start("--listen", "127.0.0.1:0", "--config", str(config), "--state", ":memory:")
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert "cannot import policy module 'nope'" in err.decode()
    assert "Traceback" not in err.decode()
