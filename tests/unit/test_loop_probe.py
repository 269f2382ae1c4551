"""The loop probe that benchmarks use to find the steps holding the AMM's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import time

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
        assert out.getvalue() == ""
    finally:
        gc.enable()
    _hog(0.2)
    await wait_for(out.getvalue, what="the hold written")
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["cpu_ms"] >= 190
    assert any("_hog" in frame for frame in record["stack"])
