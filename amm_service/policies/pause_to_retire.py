"""PauseToRetire: retire a worker that stays paused for too long.

An agent pauses itself above a fraction of its memory limit (``--pause-fraction``, 0.8 by default)
and resumes below it; while paused it receives no new replicas and loses its duplicates first.
A worker paused for longer than ``timeout`` is unlikely to recover by itself, so this policy asks
the AMM to retire it gracefully (RetireWorker then moves its data elsewhere). The core declines
when it is the last running worker or the others have no room for what only it holds; the AMM
records each decision and its reason as an event.

How long a worker has been paused comes from the view (``taken_at - status_since``), so the
policy keeps no state and a restarted AMM counts from the worker's next reported pause.
"""

from __future__ import annotations

import math

from amm.base.units import parse_duration
from amm_service.decisions.view import ClusterView, Measure, WorkerStatus
from amm_service.policies.base import PendingView, PolicyRun, RetireRequest

DEFAULT_TIMEOUT = 60.0


class PauseToRetire:
    """Ask to retire workers paused for longer than ``timeout`` (seconds or ``"30s"``)."""

    priority = 5
    """Before the policies that place replicas, so a retirement accepted this cycle is known."""
    retire_event = "pause-to-retire"
    """The event kind the AMM records for this policy's retire requests."""

    def __init__(
        self,
        *,
        timeout: float | str = DEFAULT_TIMEOUT,
        close: bool = True,
        name: str = "PauseToRetire",
    ) -> None:
        seconds = parse_duration(timeout)
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"timeout must be a finite duration > 0, not {timeout!r}")
        if not isinstance(close, bool):
            raise ValueError(f"close must be true or false, not {close!r}")
        self.timeout = seconds
        self.close = close
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        for worker in sorted(view.workers):
            ws = view.workers[worker]
            if ws.effective_status is not WorkerStatus.PAUSED or not ws.reachable:
                continue
            paused_for = view.taken_at - ws.status_since
            if paused_for > self.timeout:
                yield RetireRequest(
                    worker,
                    f"paused for {paused_for:.1f} s, longer than {self.timeout:g} s",
                    self.close,
                )

    def __repr__(self) -> str:
        return f"PauseToRetire(timeout={self.timeout:g}, close={self.close}, name={self.name!r})"
