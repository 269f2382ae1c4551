"""Carrying out retirements: the RetireWorkers call, the cycles run for it, closing agents.

``retirement`` keeps the book of retirements and judges them; this module does what needs the
AMM's I/O and timing around that book:

- ``retire_workers`` validates a RetireWorkers call, picks the cheapest workers when asked for
  ``n``, begins the retirements and waits for their results;
- ``drain`` does the same for one worker whose agent is shutting down (DrainWorker): a
  retirement that is over once every key the worker holds has a copy elsewhere, and an answer
  that lists what would be lost if it left now;
- the driver task runs cycles every interval while a caller waits for a retirement and the
  AMM's own loop is off (a retirement progresses only when cycles run); it owns that task and
  cancels and awaits it on ``close``;
- ``supervise``, once per cycle after planning, ends the retirements that are over, asking the
  agents of workers retired with ``close`` to shut down, and removes those that did;
  ``finish_emptied`` does the same for one worker between cycles, once the handover emptied it.

Not covered: which keys leave a retiring worker (the RetireWorker policy), the loop itself
(``cycle_loop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from amm.v1 import agent_pb2
from amm_service.decisions.core import Plan
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, ClusterView, Key, WorkerId
from amm_service.errors import FailedPrecondition, InvalidArgument, NotFound, listing
from amm_service.runtime.links.addresses import address_order
from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.workers.retirement import Result, Retirements, Verdict, cheapest, unique

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Drained:
    """How draining a leaving worker ended: ``drained`` when every key it holds has a copy on a
    worker that stays; ``unique`` the keys only it holds (lost if it leaves now)."""

    drained: bool
    reason: str
    unique: list[Key]


class RetirementDriver:
    """Retirements as the AMM carries them out; used from the event loop only.

    It calls back into the manager that owns it: ``check_open`` raises while the AMM cannot
    serve, ``refresh`` polls every agent, ``running`` says whether the AMM's loop runs,
    ``run_cycles(go_on, what)`` runs cycles an interval apart while ``go_on()``, ``remove``
    takes a worker out of the registry, and ``wake`` has the AMM's loop cycle now.
    """

    def __init__(
        self,
        retirements: Retirements,
        state: ClusterState,
        links: AgentLinks,
        ledger: Ledger,
        *,
        poll_timeout: float,
        check_open: Callable[[], None],
        refresh: Callable[[bool], Awaitable[object]],
        running: Callable[[], bool],
        run_cycles: Callable[[Callable[[], bool], str], Awaitable[None]],
        remove: Callable[[WorkerId], Awaitable[object]],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._retirements = retirements
        self._state = state
        self._links = links
        self._ledger = ledger
        self._poll_timeout = poll_timeout
        self._check_open = check_open
        self._refresh = refresh
        self._running = running
        self._run_cycles = run_cycles
        self._remove = remove
        self._wake = wake
        self._driver: asyncio.Task[None] | None = None

    @property
    def retirements(self) -> Retirements:
        """The book of the retirements it carries out."""
        return self._retirements

    async def retire_workers(
        self,
        workers: Sequence[str],
        *,
        n: int | None = None,
        close: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the retirement's, not this call's
    ) -> list[Result]:
        """Retire ``workers``, or the ``n`` cheapest to retire, and return how each retirement
        ended, ordered by address. While the AMM runs no cycles, cycles are run every interval
        as long as a caller waits. A caller that goes away leaves the retirements going on."""
        self._check_open()
        if not self._retirements.retirers:
            raise FailedPrecondition(
                "retiring workers needs the RetireWorker policy: add {class: RetireWorker} to "
                "the configured policies"
            )
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise InvalidArgument(f"timeout must be a finite duration > 0, not {timeout!r} s")
        if workers:
            if any(not w for w in workers):
                raise InvalidArgument("worker addresses must not be empty strings")
            wanted = list(dict.fromkeys(WorkerId(w) for w in workers))
            unknown = [w for w in wanted if self._state.worker(w) is None]
            if unknown:
                raise NotFound(f"unknown worker(s): {listing(unknown)}")
        elif n is None:
            raise InvalidArgument("give the workers to retire, or n: how many to retire")
        elif n < 1:
            raise InvalidArgument(f"n must be at least 1, not {n}")
        else:
            await self._refresh(True)  # which are cheapest is judged on what they hold now
            wanted = cheapest(self._state, n)
        results: list[Result] = []
        started = []
        for worker in wanted:
            done = None if close else self._retirements.result_now(worker)
            if done is not None:
                results.append(done)
                continue
            self._retirements.begin(
                worker, close=close, timeout=timeout, reason="asked for by a client"
            )
            started.append(worker)
        if started and not self._running():
            self.drive()
        elif started:
            self._wake()  # the retirement begins at the next cycle: now
        results += await self._retirements.wait(started)
        return sorted(results, key=lambda r: address_order(r.worker))

    async def drain(
        self,
        address: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the drain's, not this call's
    ) -> Drained:
        """Drain the worker at ``address``, whose agent is shutting down: retire it without
        closing it until every key it holds has a copy on a worker that stays, the retirement is
        abandoned (nowhere to put a key) or ``timeout`` passes. Cycles run meanwhile as for
        ``retire_workers``."""
        self._check_open()
        if not address:
            raise InvalidArgument("address is required")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise InvalidArgument(f"timeout must be a finite duration > 0, not {timeout!r} s")
        worker = WorkerId(address)
        if self._state.worker(worker) is None:
            raise NotFound(f"unknown worker: {address}")
        if not self._retirements.retirers:
            raise FailedPrecondition(
                "draining a worker needs the RetireWorker policy: add {class: RetireWorker} to "
                "the configured policies"
            )
        self._retirements.begin(
            worker,
            close=False,
            timeout=timeout,
            reason="its agent is shutting down and asked to be drained",
            leaving=True,
        )
        if self._running():
            self._wake()
        else:
            self.drive()
        (result,) = await self._retirements.wait([worker])
        view = self._state.snapshot()
        left = unique(view, worker, strict=False) if worker in view.workers else []
        return Drained(result.retired, result.reason, left)

    def drive(self) -> None:
        """Start the task that runs cycles for waiting callers while the loop is off (once)."""
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(), name="amm-retirement-driver")

    async def _drive(self) -> None:
        """Run cycles every interval while callers wait for retirements and the loop is off."""
        await self._run_cycles(
            lambda: bool(
                self._retirements.waiting and self._retirements.active and not self._running()
            ),
            "AMM cycle (run for a retirement)",
        )

    async def supervise(self, view: ClusterView, plan: Plan) -> None:
        """End the retirements that are over or cannot finish; begin those policies asked for."""
        await self._retirements.supervise(
            view,
            plan,
            busy=lambda: {entry.directive.worker for entry in self._ledger},
            close=self._close_agent,
            remove=self._remove,
            pending=self._ledger,
        )

    async def finish_emptied(self, worker: WorkerId) -> None:
        """End the retirement of ``worker`` if the state shows it empty: it answered a poll,
        holds nothing and has nothing in flight to it. For the handover, which polled it and
        holds the cycle lock; the verdict is the one a cycle gives (``retirement.review``)."""
        ws = self._state.worker(worker)
        if (
            worker not in self._retirements.active
            or ws is None
            or not ws.reachable
            or ws.last_poll is None
            or self._state.holding(worker)
            or any(entry.directive.worker == worker for entry in self._ledger)
        ):
            return
        await self._retirements.end(
            Verdict(worker, True, "holds nothing that exists nowhere else"),
            close=self._close_agent,
            remove=self._remove,
        )

    async def _close_agent(self, worker: WorkerId) -> str | None:
        """Ask a retired worker's agent to shut down: None when it agreed, "" when it refused
        because it holds keys again (the retirement goes on), otherwise why it did not close."""
        request = agent_pb2.CloseRequest(reason="retired by the AMM: it holds nothing")
        try:
            await self._links.stub(worker).Close(request, timeout=self._poll_timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.info("%s refused to close (%s); its retirement goes on", worker, err.details())
                return ""
            return f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            # A closing agent unregisters at once, and removing it closes its channel, which
            # cancels this call: that is the agent leaving, not our task being cancelled.
            if _being_cancelled():
                raise
            return "its channel closed as it unregistered"
        return None

    async def close(self) -> None:
        """Cancel and await the driver task (the AMM is shutting down); idempotent."""
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver


def _being_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not merely an awaited call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
