"""Which steps hold the event loop, for benchmarks: ``AMM_LOOP_PROBE=PATH`` in the service's
environment writes one JSON line per hold to PATH.

A hold is measured in CPU time of the loop's thread between two heartbeats of a task that
sleeps ``BEAT`` seconds, not in wall time: on a shared, loaded machine wall time mostly counts
the scheduler's preemption, which no change to the AMM removes. A watchdog thread reads that
CPU clock and, once a hold passes ``threshold``, samples the loop thread's stack, so that each
line says where the loop was held (the AMM's innermost frames) and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import TextIO

#: The environment variable naming the file to write, when the probe is wanted.
ENV = "AMM_LOOP_PROBE"
#: Seconds between two heartbeats of the loop, and between two looks of the watchdog.
BEAT = 0.005
WATCH = 0.002
#: CPU seconds of one hold from which it is written down.
THRESHOLD = 0.02
#: CPU seconds of one garbage collection from which it is written down.
GC_THRESHOLD = 0.005
#: Frames of the stack kept per hold (the innermost of the AMM's own code).
FRAMES = 6
#: Wall seconds a beat may come late before it is written down as a lag, with what the loop's
#: thread did meanwhile: ran (CPU), waited for a core (the kernel's run queue), or neither
#: (waited for the GIL, held by another of the AMM's threads).
LAG_THRESHOLD = 0.005


class LoopProbe:
    """Heartbeat task plus watchdog thread; ``run`` until cancelled."""

    def __init__(self, out: TextIO, threshold: float = THRESHOLD) -> None:
        self._out = out
        self._threshold = threshold
        self._ident = threading.get_ident()
        self._clock = time.pthread_getcpuclockid(self._ident)
        self._schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self._beat = time.clock_gettime(self._clock)
        self._beat_wall = time.monotonic()
        self._stack: list[str] | None = None
        self._done = threading.Event()
        self._gc_started = 0.0

    def _cpu(self) -> float:
        return time.clock_gettime(self._clock)

    def _queued(self) -> float:
        """Seconds the loop's thread has waited for a core so far (0 where Linux does not say)."""
        try:
            with open(self._schedstat, encoding="ascii") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    async def run(self) -> None:
        watchdog = threading.Thread(target=self._watch, name="loop probe", daemon=True)
        watchdog.start()
        gc.callbacks.append(self._collected)
        beats, queued = 0, self._queued()
        try:
            while True:
                await asyncio.sleep(BEAT)
                cpu, wall = self._cpu(), time.monotonic()
                held = cpu - self._beat
                # The next beat starts now, before this one is written down: else the watchdog
                # would take the writing for a hold and blame the next one on it.
                self._beat, self._beat_wall, beat_wall = cpu, wall, self._beat_wall
                stack, self._stack = self._stack, None
                beats += 1
                late = wall - beat_wall - BEAT
                now_queued = self._queued()
                if late >= LAG_THRESHOLD:
                    lag = {
                        "at": time.time(),
                        "lag_ms": round(late * 1e3, 1),
                        "cpu_ms": round(held * 1e3, 1),
                        "runq_ms": round((now_queued - queued) * 1e3, 1),
                        "beats": beats,
                    }
                    self._out.write(json.dumps(lag) + "\n")
                    beats = 0
                queued = now_queued
                if held >= self._threshold and stack is not None:
                    record = {
                        "at": time.time(),
                        "cpu_ms": round(held * 1e3, 1),
                        "wall_ms": round((wall - beat_wall) * 1e3, 1),
                        "stack": stack,
                    }
                    self._out.write(json.dumps(record) + "\n")
                    self._out.flush()
        finally:
            gc.callbacks.remove(self._collected)
            self._done.set()
            watchdog.join(1.0)

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        """A garbage collection in the loop's thread taking ``GC_THRESHOLD`` or more is written
        down on its own: it holds the loop wherever an allocation triggered it, so a hold's
        stack alone would blame that innocent line."""
        if threading.get_ident() != self._ident:
            return
        if phase == "start":
            self._gc_started = self._cpu()
            return
        took = self._cpu() - self._gc_started
        if took >= GC_THRESHOLD:
            record = {
                "at": time.time(),
                "gc_ms": round(took * 1e3, 1),
                "generation": info.get("generation", -1),
                "collected": info.get("collected", 0),
            }
            self._out.write(json.dumps(record) + "\n")

    def _watch(self) -> None:
        while not self._done.wait(WATCH):
            if self._stack is None and self._cpu() - self._beat >= self._threshold:
                frame = sys._current_frames().get(self._ident)
                if frame is not None:
                    self._stack = _where(frame)


def _where(frame: FrameType) -> list[str]:
    """The innermost frames of the AMM's own code (else of anything) in ``frame``'s stack.

    Only names and line numbers, walked by hand: the watchdog takes them while the loop's
    thread holds the GIL but for a switch interval at a time, and reading each frame's source
    line (``traceback.extract_stack``) took it longer than a 200 ms hold, whose stack was then
    never written."""
    summary: list[tuple[str, int, str]] = []
    current: FrameType | None = frame
    while current is not None:
        code = current.f_code
        summary.append((code.co_filename, current.f_lineno, code.co_name))
        current = current.f_back
    summary.reverse()
    ours = [f for f in summary if "amm_service" in f[0] or "/amm/" in f[0]]
    chosen = (ours or summary)[-FRAMES:]
    return [f"{Path(filename).name}:{lineno} {name}" for filename, lineno, name in chosen]


@contextlib.asynccontextmanager
async def maybe_probe() -> AsyncIterator[None]:
    """Run a ``LoopProbe`` meanwhile when ``AMM_LOOP_PROBE`` names a file; else nothing."""
    path = os.environ.get(ENV)
    if not path:
        yield
        return
    with open(path, "a", encoding="utf-8") as out:  # noqa: ASYNC230 (once, at start-up)
        task = asyncio.create_task(LoopProbe(out).run(), name="loop probe")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
