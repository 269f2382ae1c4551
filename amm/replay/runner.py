"""Replay a plan's data movement on an amm cluster, through the public client.

Every step of the plan runs as its own coroutine, owned by one ``TaskGroup``:

1. wait until its inputs exist, and until its recorded queue time;
2. *queued on its agent*: each input is pinned there (as Dask keeps a replica for a queued
   consumer); an input the agent lacks is read through it first (``prefetch``), so the agent
   fetches it from a peer and keeps the replica exactly where Dask's worker fetched it;
3. wait until its recorded start, then for its recorded duration (the "compute");
4. put an output of the recorded size on the agent, unpin the inputs, and hand the keys whose
   last consumer this was to the forgetter, which forgets them in batches through the AMM.

Nothing is computed: values are bytes of the recorded size. At the end the replay checks, with a
fresh ``who_has``, that exactly the keys that should exist do (the trace's outputs), then forgets
its own keys so the cluster is left as it was found.

Races with the AMM, which may drop an unpinned replica at any moment, are handled here:

1. an input read through the agent may be dropped before the pin arrives: the pin then fails
   with NOT_FOUND and the input is read again (a bounded number of times);
2. a source the replay remembers may have been dropped: the agent skips it, and if every source
   named is gone, the input is read again letting the agent ask the AMM who holds it.

When a step fails, or the replay is cancelled (Ctrl-C), the others are cancelled and every pin
the replay still holds is released, so that its keys can be forgotten on a cluster that outlives
the replay (``--address``). A pin or unpin call under way when its step is cancelled may still
reach the agent: it runs on and is counted when it ends, and the release waits for it. Pins are
not leases: a replay killed outright (``kill -9``) leaves its pins, which ``amm unpin --all``
releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from amm.client import AsyncClient
from amm.errors import AmmError
from amm.models import Prefetched
from amm.replay.plan import EndCheck, Lifetimes, ReplayPlan, Step

MAX_PIN_ATTEMPTS = 5
PIN_PATIENCE = 30.0
"""Seconds a step waits for room to pin an input on its worker before the replay fails."""
T = TypeVar("T")
FORGET_BATCH_DELAY = 0.05
"""Seconds the forgetter waits for more keys before a Forget, so that keys released together
(the inputs of one step, the steps finishing in one burst) cost the AMM one call."""


class ReplayError(RuntimeError):
    """A step of the replay failed; the message names the step and the call."""


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """What one replay did; sizes in bytes, times in seconds."""

    wall_seconds: float
    steps: int
    bytes_put: int
    bytes_transferred: int
    """Bytes agents fetched from peers (and kept) to serve the replay's reads of task inputs."""
    replicas_fetched: int
    replicas_forgotten: int
    """Replicas deleted when the replay forgot keys whose last consumer had finished."""
    replicas_at_end: int
    max_lag: float
    """How late, at worst, a step started compared with its (scaled) recorded start."""
    check: EndCheck

    @property
    def replicas_dropped(self) -> int:
        """Replicas that disappeared other than by the replay's forgets: the AMM's drops.

        Every replica is created by a put or a fetch of the replay (the AMM's policy here only
        drops), and ends forgotten, dropped, or still there at the end.
        """
        return self.steps + self.replicas_fetched - self.replicas_forgotten - self.replicas_at_end


class _Payloads:
    """One value per distinct size, cut from one random block, so puts cost no generation."""

    def __init__(self) -> None:
        self._by_size: dict[int, bytes] = {}
        self._block = b""

    def get(self, size: int) -> bytes:
        value = self._by_size.get(size)
        if value is None:
            if len(self._block) < size:
                self._block = os.urandom(size)
            value = self._by_size[size] = self._block[:size]
        return value


class Forgetter:
    """Forgets released keys through the AMM in batches; ``drain`` waits until none is left."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.deleted = 0

    def add(self, keys: Sequence[str]) -> None:
        if keys:
            self._pending.extend(keys)
            self._idle.clear()
            self._wake.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FORGET_BATCH_DELAY)
            self._wake.clear()
            batch, self._pending = self._pending, []
            await self.forget(batch)
            if not self._pending:
                self._idle.set()

    async def forget(self, keys: list[str]) -> None:
        """Forget ``keys``; on a partial failure, key by key, a key already gone being done."""
        try:
            self.deleted += await self._client.forget(keys)
            return
        except AmmError as err:
            if err.status not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
        for key in keys:
            for attempt in range(MAX_PIN_ATTEMPTS):
                try:
                    self.deleted += await self._client.forget([key])
                    break
                except AmmError as err:
                    if err.status == grpc.StatusCode.NOT_FOUND:
                        break
                    if err.status != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    if attempt == MAX_PIN_ATTEMPTS - 1:
                        raise ReplayError(f"could not forget {key!r}: {err.message}") from err
                    await asyncio.sleep(0.1 * (attempt + 1))


class Replayer:
    """Runs one plan on the agents at ``agents`` (index = the plan's worker number)."""

    def __init__(
        self,
        client: AsyncClient,
        plan: ReplayPlan,
        agents: Sequence[str],
        *,
        on_step: Callable[[Step], None] | None = None,
    ) -> None:
        if len(agents) < plan.workers:
            raise ValueError(f"the plan needs {plan.workers} agents, {len(agents)} given")
        self._client = client
        self._plan = plan
        self._agents = list(agents)
        self._on_step = on_step
        self._lifetimes = Lifetimes(plan)
        self._produced = {step.key: asyncio.Event() for step in plan.steps}
        self._holders: dict[str, list[str]] = {}
        self._pins: Counter[tuple[str, str]] = Counter()
        self._pinning: set[asyncio.Task[Any]] = set()
        self._payloads = _Payloads()
        self._forgetter = Forgetter(client)
        self._t0 = 0.0
        self._bytes_put = 0
        self._bytes_transferred = 0
        self._fetched = 0
        self._max_lag = 0.0

    async def run(self) -> ReplayStats:
        """Replay every step, check the end state, then forget what is left of the replay."""
        wall = await self.play()
        check, held = await self.check_end()
        forgotten = self._forgetter.deleted
        await self.cleanup(list(held))
        return ReplayStats(
            wall_seconds=wall,
            steps=len(self._plan.steps),
            bytes_put=self._bytes_put,
            bytes_transferred=self._bytes_transferred,
            replicas_fetched=self._fetched,
            replicas_forgotten=forgotten,
            replicas_at_end=sum(len(h) for h in held.values()),
            max_lag=self._max_lag,
            check=check,
        )

    async def play(self) -> float:
        """Run every step and drain the forgets; returns the wall time of the steps."""
        self._t0 = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                forgetting = group.create_task(self._forgetter.run(), name="replay forgetter")
                steps = [
                    group.create_task(self._run_step(step), name=f"replay {step.recorded_key}")
                    for step in self._plan.steps
                ]
                await asyncio.wait(steps)
                wall = time.monotonic() - self._t0
                await self._forgetter.drain()
                forgetting.cancel()
        except BaseExceptionGroup as group_error:
            await self.release_pins()
            raise _first_error(group_error) from None
        except BaseException:  # cancelled (Ctrl-C): the steps are cancelled, their pins stay
            await self.release_pins()
            raise
        return wall

    async def release_pins(self) -> None:
        """Unpin what failed or cancelled steps still hold: pinned replicas cannot be forgotten.

        Pin and unpin calls still under way are waited for first: the agent may carry out a
        call whose caller was cancelled, and its pin would be left behind."""
        while self._pinning:
            await asyncio.gather(*self._pinning, return_exceptions=True)
        for (key, agent), count in self._pins.items():
            for _ in range(count):
                with contextlib.suppress(AmmError):
                    await self._client.unpin(key, agent)
        self._pins.clear()

    async def check_end(self) -> tuple[EndCheck, dict[str, tuple[str, ...]]]:
        """Compare what the cluster holds under the replay's prefix (asked fresh) with what
        should exist now; returns the check and the replay's keys with their holders."""
        held = await self._client.who_has(fresh=True)
        prefix = f"{self._plan.prefix}/"
        ours = {k: h for k, h in held.items() if k.startswith(prefix) and h}
        return self._lifetimes.check(held, self._plan.prefix), ours

    async def cleanup(self, keys: list[str]) -> None:
        """Forget the replay's keys still on the cluster (its outputs, or leftovers)."""
        if keys:
            await self._forgetter.forget(keys)

    async def _sleep_until(self, at: float) -> float:
        """Sleep until ``at`` seconds after the start; returns how late we already were."""
        delay = self._t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
            return 0.0
        return -delay

    async def _run_step(self, step: Step) -> None:
        agent = self._agents[step.worker]
        try:
            for name in step.inputs:
                await self._produced[name].wait()
            await self._sleep_until(step.queued)
            # A TaskGroup, not gather: when one input fails, the others are cancelled and
            # awaited, so no pin lands after the replay released its pins.
            try:
                async with asyncio.TaskGroup() as holds:
                    for name in step.inputs:
                        holds.create_task(self._hold(name, agent))
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None
            self._max_lag = max(self._max_lag, await self._sleep_until(step.start))
            await asyncio.sleep(step.duration)
            await self._client.put(step.key, self._payloads.get(step.nbytes), workers=[agent])
            self._bytes_put += step.nbytes
            self._holders[step.key] = [agent]
            self._produced[step.key].set()
            for name in step.inputs:
                await self._counted(self._client.unpin(name, agent), (name, agent), _unpinned)
        except AmmError as err:
            raise ReplayError(
                f"step {step.recorded_key!r} on {agent}: {err.status.name}: {err.message}"
            ) from err
        self._forgetter.add(self._lifetimes.produced(step.key))
        self._forgetter.add(self._lifetimes.finished(step.key))
        if self._on_step is not None:
            self._on_step(step)

    async def _counted(
        self, call: Coroutine[Any, Any, T], pin: tuple[str, str], by: Callable[[T], int]
    ) -> T:
        """Await a pin, unpin or pinning read and count it in ``_pins`` (``by`` its result) once
        it succeeded, even if the caller is cancelled meanwhile: the call runs on as a task."""
        task = asyncio.ensure_future(call)
        self._pinning.add(task)

        def count(done: asyncio.Task[T]) -> None:
            self._pinning.discard(done)
            if not done.cancelled() and done.exception() is None:
                self._pins[pin] += by(done.result())

        task.add_done_callback(count)
        return await asyncio.shield(task)

    async def _hold(self, key: str, agent: str) -> None:
        """Pin ``key`` on ``agent``, reading it through the agent first when it lacks it.

        The read pins as it lands (``prefetch(pin=True)``), so the AMM cannot drop the new
        replica before the pin; an agent with no room to keep it is asked again, backing off,
        as a Dask worker waits for memory before it gathers a task's inputs."""
        deadline = time.monotonic() + PIN_PATIENCE
        delay = 0.05
        while True:
            try:
                await self._counted(self._client.pin(key, agent), (key, agent), _pinned)
                return
            except AmmError as err:
                if err.status != grpc.StatusCode.NOT_FOUND:
                    raise
            sources = [h for h in self._holders.get(key, ()) if h != agent]
            try:
                got = await self._pinning_read(key, agent, sources)
            except AmmError as no_room:
                if no_room.status != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if time.monotonic() + delay > deadline:
                    raise ReplayError(
                        f"could not pin {key!r} on {agent} for {PIN_PATIENCE:.0f} s: "
                        f"{no_room.message}"
                    ) from no_room
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if got.fetched:
                self._fetched += 1
                self._bytes_transferred += got.size
                self._holders.setdefault(key, []).append(agent)
            if got.pins:
                return
            if time.monotonic() > deadline:  # an agent that cannot pin on a read, and loses it
                raise ReplayError(
                    f"could not pin {key!r} on {agent}: the replica kept going between its "
                    f"read and the pin for {PIN_PATIENCE:.0f} s"
                )

    async def _pinning_read(self, key: str, agent: str, sources: list[str]) -> Prefetched:
        """``prefetch(pin=True)`` from ``sources``, else from the holders the AMM names."""
        try:
            return await self._counted(
                self._client.prefetch(key, agent, sources=sources, pin=True),
                (key, agent),
                _pinned_by_read,
            )
        except AmmError as err:
            if err.status != grpc.StatusCode.NOT_FOUND or not sources:
                raise
        # Every source we knew of dropped it: let the agent ask the AMM.
        return await self._counted(
            self._client.prefetch(key, agent, pin=True), (key, agent), _pinned_by_read
        )


def _pinned(_: object) -> int:
    return 1


def _unpinned(_: object) -> int:
    return -1


def _pinned_by_read(got: Prefetched) -> int:
    return 1 if got.pins else 0


async def forget_prefix(client: AsyncClient, prefix: str) -> int:
    """Forget every key under ``prefix/``: what a failed or interrupted replay left behind."""
    held = await client.who_has(fresh=True)
    keys = [k for k, holders in held.items() if k.startswith(f"{prefix}/") and holders]
    forgetter = Forgetter(client)
    if keys:
        await forgetter.forget(keys)
    return forgetter.deleted


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure in a task group, a replay error if there is one."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, ReplayError | AmmError):
            return leaf
    return leaves[0]
