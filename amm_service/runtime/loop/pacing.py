"""Letting other work in between the steps of a big cycle (planning, sending, poll merging,
outcomes), and keeping the garbage collector out of each step.

The AMM's bulk loops pace themselves in shifts shared by all of them (``amm.base.shifts``, which
the agent's pacing shares): once ``BUDGET`` of bulk work is spent, none runs for a pause, so that
a control call (``Running``, ``GetStatus``, a fresh ``WhoHas``), which takes several turns of
the loop to be answered, waits for about one budget of bulk work, not one per turn. While a call
arrives (``watch_arrivals``) and while one waits on the loop (``urgent``), the budget is a slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from amm.base import heap, malloc
from amm.base.shifts import PAUSE, Paced

#: Most seconds of bulk work between two breaths (``Budget``).
BUDGET = 0.005
#: The same while a control call is under way and waits on the loop (``urgent``): about one
#: slice of bulk work between two breaths.
URGENT_BUDGET = 0.0005
#: Control calls under way that wait on the loop (``urgent``).
_urgent = 0
#: Wall seconds a call's arrival is hurried at most (``watch_arrivals``): its handler says when
#: it has arrived, but a stream's handler, or a call cancelled on the way, does not.
ARRIVAL = 0.02
#: The name of the coroutine grpc.aio's server schedules for each call it is handed
#: (``grpc._cython.cygrpc._schedule_rpc_coro``): the first the loop sees of a call.
SERVER_CALL = "_schedule_rpc_coro"
#: Calls handed to the loop whose handler has not run yet, and when the last of them stops
#: being hurried (``time.monotonic``).
_arriving = 0
_arrival_ends = 0.0


@contextlib.contextmanager
def urgent() -> Iterator[None]:
    """While a control call is under way that awaits answers (a fresh ``who_has`` asks every
    agent): bulk work breathes after about every slice (``URGENT_BUDGET``), not once per
    ``BUDGET``, so that each answer is taken in at once, not after up to a budget of bulk work
    each. Bulk work runs as before once no such call is under way."""
    global _urgent
    _urgent += 1
    try:
        yield
    finally:
        _urgent -= 1


def arriving() -> None:
    """A call was handed to the loop: bulk work breathes after about every slice until its
    handler runs (``arrived``), or ``ARRIVAL`` seconds at most."""
    global _arriving, _arrival_ends
    _arriving += 1
    _arrival_ends = time.monotonic() + ARRIVAL


def arrived() -> None:
    """A call's handler runs: its arrival no longer hurries bulk work."""
    global _arriving
    if _arriving:
        _arriving -= 1


def hurried() -> bool:
    """Whether bulk work breathes after about every slice now (``urgent``, ``arriving``)."""
    global _arriving
    if _urgent:
        return True
    if _arriving:
        if time.monotonic() < _arrival_ends:
            return True
        _arriving = 0  # calls that never reached a handler that says so
    return False


def watch_arrivals(loop: asyncio.AbstractEventLoop) -> None:
    """Hurry bulk work from the moment gRPC hands a call to ``loop`` until its handler runs.

    A unary call takes four turns of the loop or more before its handler runs (the call handed
    over by gRPC's poller thread, two tasks that schedule it, its request read), and the bulk
    work under way took up to a budget in several of them: 4-8 ms of the loop's CPU before the
    handler of a ``Running`` began, during a 100k-key convergence. The first the loop sees of a
    call is the task grpc.aio creates for it; a task factory notes it (``arriving``) and the
    control handlers say when they run (``arrived``). Idempotent; the factory found is kept."""
    previous = loop.get_task_factory()
    if getattr(previous, "watches_arrivals", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if getattr(coro, "__name__", None) == SERVER_CALL:
            arriving()
        if previous is None:
            return asyncio.Task(coro, loop=loop, **kwargs)
        return previous(loop, coro, **kwargs)

    factory.watches_arrivals = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


async def breathe() -> None:
    """Let the event loop, and gRPC's poller thread, run for a moment."""
    await asyncio.sleep(PAUSE)


class Budget(Paced):
    """Breathes between two small slices of bulk work once ``budget`` seconds of it were done
    since the last pause by this task and every other one pacing itself so, then pauses with all
    of them (``amm.base.shifts``): the loop is held for about ``budget`` at a time, however many
    bulk tasks run at once (a cycle's polls of every agent, the directive streams' outcomes,
    planning), whatever a slice costs on this machine, without paying a pause per slice. Budgets
    of each task alone let every turn of the loop, and so each step of a control call, take a
    budget of bulk work or more.

    Wall time, not CPU: on a loaded machine a slice takes longer, and the loop is let in as
    often."""

    __slots__ = ("_budget",)

    def __init__(
        self, budget: float | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        super().__init__(clock)
        self._budget = BUDGET if budget is None else budget

    async def __call__(self) -> bool:
        """Breathe if the shift's budget is spent or a pause is under way; whether it did (what
        was read before may be stale)."""
        return await self._breathe(URGENT_BUDGET if hurried() else self._budget)


#: Tracked objects bulk steps may leave behind, in all, before they are frozen.
FREEZE_AFTER = 10_000
#: Whether the heap is kept out of collections (``HeapFreezer``).
_frozen = False
#: Tracked objects bulk steps left behind since the last freeze (about: what they allocated
#: and had not freed when they ended).
_left = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one bounded step of bulk bookkeeping.

    A big cycle allocates hundreds of thousands of acyclic objects (ledger entries, messages,
    outcomes); every collection they trigger walks the AMM's whole state, which made entering
    300k directives in the ledger three times slower. Collections resume between steps.

    What the step left alive is frozen at once (``gc.freeze`` splices lists: it costs nothing)
    while the heap is kept frozen (``HeapFreezer``), or once bulk steps have left
    ``FREEZE_AFTER`` tracked objects since the last freeze (the first poll of a big cluster,
    before anyone knows it is big). Otherwise the first allocation after a step collected every
    object it made, 10-25 ms of the loop each time, and the full collections that follow walked
    all that the steps had added since the last freeze, up to 120 ms each (``loop_probe``
    during a 100k-key cycle).
    """
    global _left
    collecting = gc.isenabled()
    gc.disable()
    before = gc.get_count()[0]
    try:
        yield
    finally:
        # What this step left, not the young generation's whole count: that includes what was
        # allocated before the step since the last collection (up to its threshold, 700), so
        # that 15 steps that left nothing froze a small AMM's whole heap, and its cyclic
        # garbage with it, until the next thaw (``benchmarks/soak.py --heap``).
        _left += max(0, gc.get_count()[0] - before)
        if _frozen or _left >= FREEZE_AFTER:
            gc.freeze()
            _left = 0
        if collecting:
            gc.enable()


#: Seconds between two trims of the C heap (see ``HeapFreezer``).
TRIM_EVERY = 60.0


class HeapFreezer(heap.HeapFreezer):
    """Keeps the AMM's long-lived state out of the cyclic garbage collector's full collections
    (``amm.base.heap``).

    With 100k keys the AMM holds millions of objects (the cluster state, the ledger), nearly
    all acyclic and freed by reference counting. Each full collection walks all of them (100-300
    ms with the loop held, 12% of the AMM's CPU in a 100k-key cycle, measured with py-spy): the
    AMM freezes after each poll round and cycle. A frozen heap also has ``gc_paused`` freeze
    what each bulk step leaves.

    Every ``trim_every`` seconds it also gives the C heap's free memory back to the system
    (``malloc.trim``): gRPC's threads allocate from arenas of their own, and what they free
    below a chunk in use stays resident. A 10-minute soak (``benchmarks/soak.py --heap``) saw
    the AMM's thread arenas go from 2 to 8 MiB resident after one forget of 8,000 keys, and stay
    there; trimmed, they held 2 MiB.
    """

    def __init__(
        self,
        thaw_every: float = heap.THAW_EVERY,
        clock: Callable[[], float] = time.monotonic,
        *,
        trim_every: float = TRIM_EVERY,
        trim: Callable[[], object] = malloc.trim,
    ) -> None:
        super().__init__(thaw_every, clock)
        self._trim_every = trim_every
        self._trim = trim
        self._trimmed = clock()

    def freeze(self, big: bool = True) -> None:
        global _frozen, _left
        now = self._clock()
        if now - self._trimmed >= self._trim_every:
            self._trimmed = now
            self._trim()
        super().freeze(big)
        _frozen = big
        _left = 0
