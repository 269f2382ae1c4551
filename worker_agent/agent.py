"""The worker agent as a whole: its gRPC server, its background tasks and its life cycle.

``Agent`` owns a ``Node`` (the state and operations), the server that exposes it, the channel to
the AMM and three named background tasks: the memory sampler, the registration loop and the
close watcher, which stops the agent once a ``Close`` call was accepted. ``start`` binds and
registers; ``stop`` is idempotent and tears down in order: CLOSING and health NOT_SERVING,
background tasks cancelled, directive streams ended, then unregistration (short deadline) and
``server.stop(grace)`` at the same time, channels closed; ``stopped`` is set at the end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

import grpc

from amm.base.serving import Served, bound_address, open_channel, serve
from amm.v1 import control_pb2, control_pb2_grpc
from worker_agent.advertise import advertised_address
from worker_agent.config import AgentConfig
from worker_agent.errors import Unavailable
from worker_agent.memory import MemoryProbe, PsutilProbe
from worker_agent.node import Node
from worker_agent.servicer import SERVICE_NAME, WorkerAgentServicer, add_to_server
from worker_agent.store import Key, Store

log = logging.getLogger(__name__)

#: Re-register when the AMM has not polled for this many of its intervals.
SILENCE_INTERVALS = 3
#: Deadline of one RegisterWorker call (at least ``register_backoff_max``). Generous: an AMM
#: that a thousand agents join at once answers the last of them seconds later, and an attempt
#: given up on is sent again, which only adds to its queue (2 s failed 110-640 of 1,000 first
#: attempts in ``benchmarks/bench_scale.py``'s set-up, 10 s none). An AMM that is down refuses at
#: once, whatever the deadline; the stop cancels an attempt under way.
REGISTER_TIMEOUT = 10.0
UNREGISTER_TIMEOUT = 0.5


class Agent:
    """One worker agent; use ``async with Agent(config) as agent`` or ``start``/``stop``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        probe: MemoryProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.node = Node(
            config,
            probe=probe if probe is not None else PsutilProbe(),
            clock=clock,
            who_has=self._who_has if config.amm else None,
        )
        self._served: Served | None = None
        self._amm: control_pb2_grpc.ActiveMemoryManagerAsyncStub | None = None
        self._amm_channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False
        self._started = False
        self._stopping: asyncio.Task[None] | None = None
        #: Set once the agent has stopped, whoever stopped it (``stop`` or a ``Close`` call).
        self.stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """The advertised ``host:port`` peers and the AMM dial; set by ``start``."""
        if not self.node.address:
            raise RuntimeError("the agent has no address before start()")
        return self.node.address

    @property
    def incarnation(self) -> str:
        return self.node.incarnation

    @property
    def store(self) -> Store:
        return self.node.store

    @property
    def registered(self) -> bool:
        """Whether the last registration attempt with the AMM succeeded."""
        return self._registered

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # a start that failed after binding leaves no server behind
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the server, then sample memory and register in the background.

        Raises ``OSError`` when the listen address cannot be bound or, with ``advertise='auto'``,
        no address to advertise can be found.
        """
        if self._started:
            return
        self._started = True
        servicer = WorkerAgentServicer(self.node)
        self._served = await serve(
            self.config.listen,
            [lambda server: add_to_server(servicer, server)],
            [SERVICE_NAME],
            security=self.config.security,
            insecure=self.config.insecure,
        )
        self.node.address = await asyncio.to_thread(
            advertised_address,
            bound_address(self.config.listen, self._served.port),
            self.config.advertise,
            self.config.amm,
        )
        self.node.sample_memory()
        self._spawn(self._sample_memory(), "agent memory sampler")
        self._spawn(self._close_when_asked(), "agent close watcher")
        if self.config.amm:
            self._amm_channel = open_channel(self.config.amm, self.config.security)
            self._amm = control_pb2_grpc.ActiveMemoryManagerStub(self._amm_channel)
            self._spawn(self._register(self._amm), "agent registration")
        log.info(
            "agent %s serving on %s%s (incarnation %s)",
            self.node.name,
            self.address,
            " with mutual TLS" if self.config.security else "",
            self.incarnation,
        )

    async def stop(self) -> None:
        """Shut down; idempotent, and concurrent calls wait for the same shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(), name="agent stop")
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self.node.closing = True
        if self._served is not None:
            await self._served.set_serving(False)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.node.shutdown.set()  # our directive streams end themselves (grpc/grpc#37239)
        # Each may take its whole deadline (an AMM or clients that do not answer): not in turn.
        await asyncio.gather(self._unregister(), self._stop_server())
        await self.node.close()
        if self._amm_channel is not None:
            await self._amm_channel.close(None)
        log.info("agent %s stopped", self.node.address or "(never started)")
        self.stopped.set()

    async def _stop_server(self) -> None:
        if self._served is not None:
            await self._served.stop(self.config.stop_grace)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_report_exit)
        self._tasks.append(task)

    async def _close_when_asked(self) -> None:
        """Stop once a ``Close`` call was accepted. The stop runs in its own task (``stop``), so
        that cancelling this watcher, as the stop does, leaves the stop going on."""
        await self.node.close_requested.wait()
        await self.stop()

    async def _sample_memory(self) -> None:
        """Keep the unmanaged-memory window filled even when nobody polls."""
        while True:
            await asyncio.sleep(self.config.memory_interval)
            self.node.sample_memory()

    async def _register(self, amm: control_pb2_grpc.ActiveMemoryManagerAsyncStub) -> None:
        """Register with the AMM, retrying with backoff, and again after any long silence.

        1. The AMM is not up yet: retry from 0.1 s, doubling up to ``register_backoff_max``.
           Failures are logged as warnings at the first and tenth attempts, then every
           ``register_warning_interval`` (the rest at DEBUG), so that a long outage stays
           visible without flooding the log.
        2. The AMM restarted and forgot this agent: it stops polling; after ``SILENCE_INTERVALS``
           of its intervals without a poll, register again.
        3. The AMM is up but busy (many agents joining at once): each attempt waits
           ``REGISTER_TIMEOUT`` for its answer rather than give up and queue another.
        """
        loop = asyncio.get_running_loop()
        delay = 0.1
        attempts = 0
        warned_at = -math.inf
        epoch: int | None = None
        while True:
            attempts += 1
            # The newest epoch seen lets a freshly started AMM move its epoch past it.
            request = control_pb2.RegisterWorkerRequest(
                address=self.address,
                name=self.node.name,
                incarnation=self.incarnation,
                epoch=self.node.newest_epoch,
                zone=self.config.zone,
            )
            try:
                response = await amm.RegisterWorker(
                    request, timeout=max(REGISTER_TIMEOUT, self.config.register_backoff_max)
                )
            except grpc.aio.AioRpcError as err:
                self._registered = False
                now = loop.time()
                warn = attempts in (1, 10) or (
                    attempts > 10 and now - warned_at >= self.config.register_warning_interval
                )
                if warn:
                    warned_at = now
                log.log(
                    logging.WARNING if warn else logging.DEBUG,
                    "cannot register with %s yet (%s: %s; %d attempts); retrying",
                    self.config.amm,
                    err.code().name,
                    err.details(),
                    attempts,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.register_backoff_max)
                continue
            self._registered = True
            attempts, delay = 0, 0.1
            if response.epoch != epoch:
                log.info("registered with %s (epoch %d)", self.config.amm, response.epoch)
                epoch = response.epoch
            self.node.observe_epoch(response.epoch)
            self.node.registered_epoch = response.epoch
            # Clamped: an absurd interval must neither overflow nor silence re-registration.
            interval = min(max(response.interval.ToNanoseconds() / 1e9, 0.05), 3600.0)
            await self._until_silent(SILENCE_INTERVALS * interval)
            # Also routine while the AMM runs no cycles (it polls only then): hence DEBUG.
            log.debug("not polled for %.2f s; registering again", SILENCE_INTERVALS * interval)

    async def _until_silent(self, silence: float) -> None:
        """Return once ``silence`` seconds pass without a poll."""
        while True:
            self.node.polled.clear()
            try:
                async with asyncio.timeout(silence):
                    await self.node.polled.wait()
            except TimeoutError:
                return

    async def _unregister(self) -> None:
        if self._amm is None or not self._registered:
            return
        try:
            await self._amm.UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=self.address),
                timeout=UNREGISTER_TIMEOUT,
            )
        except grpc.aio.AioRpcError as err:
            log.warning("could not unregister from %s: %s", self.config.amm, err.code().name)

    async def _who_has(self, key: Key) -> list[str]:
        if self._amm is None:
            return []
        try:
            response = await self._amm.WhoHas(
                control_pb2.WhoHasRequest(keys=[key], fresh=True), timeout=self.config.fetch_timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return []  # the AMM knows no holder: the caller answers NOT_FOUND
            raise Unavailable(f"cannot ask the AMM who holds {key!r}: {err.code().name}") from err
        return [
            worker for entry in response.entries if entry.key == key for worker in entry.workers
        ]


def _report_exit(task: asyncio.Task[None]) -> None:
    """Background tasks run until cancelled; any other end is a bug worth a log line."""
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=err)
        return
    log.error("background task %s exited unexpectedly", task.get_name())
