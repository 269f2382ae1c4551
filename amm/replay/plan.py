"""What a replay does, decided before it starts, and the bookkeeping of keys while it runs.

``make_plan`` turns a trace into steps for an amm cluster: each recorded worker is mapped onto an
agent (round-robin over the recorded workers in order), times and sizes are scaled, and keys get
a prefix of the run's own so that a replay never touches anyone else's keys. ``Lifetimes`` then
says, as tasks finish, which keys may be forgotten: a key lives until its last consumer has
finished, as a Dask scheduler releases a key once no task still needs it, and the trace's
outputs live until the end. What the end of a replay should leave behind is exactly what
``Lifetimes`` still holds, which ``end_check`` compares with what the cluster holds.

Pure: no I/O, no clock; the runner (``amm.replay.runner``) does the waiting and the calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from amm.replay.trace import Trace


@dataclass(frozen=True, slots=True)
class Scale:
    """Factors applied to the recorded times and sizes (1 = as recorded).

    ``time`` 0.5 replays twice as fast; ``bytes`` 0.25 puts a quarter of each recorded size (at
    least one byte for a non-empty value), so the memory curve keeps its shape at a quarter of
    its height.
    """

    time: float = 1.0
    bytes: float = 1.0

    def __post_init__(self) -> None:
        for name in ("time", "bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"the {name} scale must be a positive number, not {value!r}")

    def size(self, nbytes: int) -> int:
        if nbytes == 0:
            return 0
        return max(1, round(nbytes * self.bytes))


@dataclass(frozen=True, slots=True)
class Step:
    """One task as the replay runs it; times in seconds from the replay's start.

    The step is queued on its agent at ``queued`` (or once its inputs exist, if later): its
    inputs are read through the agent and pinned there. It computes from ``start`` (or once they
    are read, if later) for ``duration``, then puts ``nbytes`` under ``key`` on the agent.
    """

    key: str
    recorded_key: str
    worker: int
    queued: float
    start: float
    duration: float
    inputs: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Steps in dependency order; ``workers`` is the number of agents they are spread over."""

    steps: tuple[Step, ...]
    outputs: tuple[str, ...]
    workers: int
    worker_map: Mapping[str, int]
    scale: Scale
    prefix: str

    @property
    def total_bytes(self) -> int:
        return sum(step.nbytes for step in self.steps)

    @property
    def makespan(self) -> float:
        return max((step.start + step.duration for step in self.steps), default=0.0)

    def consumers(self) -> dict[str, int]:
        """How many steps read each key (0 for keys nobody reads)."""
        counts = {step.key: 0 for step in self.steps}
        for step in self.steps:
            for name in step.inputs:
                counts[name] += 1
        return counts


def make_plan(trace: Trace, workers: int, scale: Scale, prefix: str) -> ReplayPlan:
    """Map ``trace`` onto ``workers`` agents and scale it; keys become ``prefix/recorded-key``."""
    if workers < 1:
        raise ValueError(f"a replay needs at least one worker, not {workers}")
    names = trace.workers
    worker_map = {name: i % workers for i, name in enumerate(names)}

    def key(recorded: str) -> str:
        return f"{prefix}/{recorded}"

    stops = {task.key: task.stop for task in trace.tasks}
    steps = []
    for task in trace.tasks:
        ready = max((stops[name] for name in task.inputs), default=0.0)
        queued = task.queued if task.queued is not None else ready
        # Clocks of the scheduler and the workers differ by a little: never queued after start.
        queued = min(queued, task.start)
        steps.append(
            Step(
                key=key(task.key),
                recorded_key=task.key,
                worker=worker_map[task.worker],
                queued=queued * scale.time,
                start=task.start * scale.time,
                duration=task.duration * scale.time,
                inputs=tuple(key(name) for name in task.inputs),
                nbytes=scale.size(task.nbytes),
            )
        )
    return ReplayPlan(
        steps=tuple(steps),
        outputs=tuple(key(name) for name in trace.outputs),
        workers=workers,
        worker_map=MappingProxyType(worker_map),
        scale=scale,
        prefix=prefix,
    )


@dataclass(frozen=True, slots=True)
class EndCheck:
    """What the cluster holds at the end of a replay, against what it should hold."""

    expected: frozenset[str]
    missing: frozenset[str]
    extra: frozenset[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra

    def describe(self, limit: int = 3) -> str:
        if self.ok:
            return f"ok: exactly the {len(self.expected)} expected key(s) exist"
        parts = []
        for what, keys in (("missing", self.missing), ("unexpected", self.extra)):
            if keys:
                shown = ", ".join(sorted(keys)[:limit]) + (", ..." if len(keys) > limit else "")
                parts.append(f"{len(keys)} {what}: {shown}")
        return "FAILED: " + "; ".join(parts)


class Lifetimes:
    """Which keys exist now, and which to forget as steps finish.

    1. A key is forgotten once every step that reads it has finished.
    2. A key nobody reads is forgotten as soon as it is produced, unless it is an output.
    3. Outputs are never forgotten by the replay itself: they must exist at the end.
    """

    def __init__(self, plan: ReplayPlan) -> None:
        self._remaining = plan.consumers()
        self._outputs = frozenset(plan.outputs)
        self._live: set[str] = set()
        self._inputs = {step.key: step.inputs for step in plan.steps}

    @property
    def live(self) -> frozenset[str]:
        """Keys produced and not (to be) forgotten: what the cluster should hold now."""
        return frozenset(self._live)

    def produced(self, key: str) -> list[str]:
        """``key`` now exists; returns it if nothing will ever read it (rule 2)."""
        if key not in self._remaining:
            raise KeyError(f"{key!r} is not a step of the plan")
        if key in self._live:
            raise ValueError(f"{key!r} was produced twice")
        self._live.add(key)
        return self._release([key]) if self._remaining[key] == 0 else []

    def finished(self, key: str) -> list[str]:
        """The step producing ``key`` is done reading its inputs; returns the keys to forget."""
        done = []
        for name in self._inputs[key]:
            if self._remaining[name] <= 0:
                raise ValueError(f"{key!r} finished reading {name!r}, which had no reader left")
            self._remaining[name] -= 1
            if self._remaining[name] == 0:
                done.append(name)
        return self._release(done)

    def _release(self, keys: Iterable[str]) -> list[str]:
        gone = [k for k in keys if k not in self._outputs and k in self._live]
        self._live.difference_update(gone)
        return gone

    def check(self, held: Mapping[str, Iterable[str]], prefix: str) -> EndCheck:
        """Compare the live keys with ``held`` (key -> holders, as ``who_has`` answers).

        Only keys under ``prefix/`` count as the replay's; a key listed without holders does
        not exist.
        """
        ours = {k for k, holders in held.items() if k.startswith(f"{prefix}/") and any(holders)}
        expected = frozenset(self._live)
        return EndCheck(expected, frozenset(expected - ours), frozenset(ours - expected))
