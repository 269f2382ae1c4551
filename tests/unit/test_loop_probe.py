"""The loop probe that benchmarks use to find the steps holding the AMM's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import time
from typing import Any

from amm_service.runtime.loop.loop_probe import LoopProbe
from tests.support.waiting import wait_for


def _hog(seconds: float) -> None:
    """Hold the loop for ``seconds`` of CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_hold_over_the_threshold_is_written_with_where_it_was() -> None:
    out = io.StringIO()
    # A full collection of the whole suite's heap is a real hold of the loop, but not this test's.
    gc.collect()
    gc.disable()
    try:
        probe = asyncio.create_task(LoopProbe(out, threshold=0.05).run())
        await asyncio.sleep(0.05)
        for _ in range(20):
            await asyncio.sleep(0.01)  # short steps: nothing to write
            _hog(0.001)
        assert not _holds(out)  # (beats late on a busy machine are, with why: see below)
    finally:
        gc.enable()
    _hog(0.2)
    await wait_for(lambda: _holds(out), what="the hold written")
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    (record,) = _holds(out)
    assert record["cpu_ms"] >= 190
    assert any("_hog" in frame for frame in record["stack"])
    # The beat it made late is written down too, with the loop's own CPU meanwhile (the rest
    # of the time it waited for a core or for the GIL).
    late = [r for r in _records(out) if "lag_ms" in r and r["cpu_ms"] >= 190]
    assert late, "the late beat"
    assert late[0]["lag_ms"] >= 190
    assert late[0]["runq_ms"] >= 0
    assert late[0]["beats"] >= 1


def _records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _holds(out: io.StringIO) -> list[dict[str, Any]]:
    """The holds written (not the late beats, nor the collections)."""
    return [r for r in _records(out) if "stack" in r]
