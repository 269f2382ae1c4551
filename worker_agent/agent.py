"""The worker agent as a whole: its gRPC server, its background tasks and its life cycle.

``Agent`` owns a ``Node`` (the state and operations), the server that exposes it, the channel to
the AMM and three named background tasks: the memory sampler, the registration loop and the
close watcher, which stops the agent once a ``Close`` call was accepted. ``start`` binds and
registers; ``drain`` (on SIGTERM) asks the AMM to copy what only this worker holds elsewhere
before a stop; ``stop`` is idempotent and tears down in order: CLOSING and health NOT_SERVING,
background tasks cancelled, directive streams ended, unregistration (the AMM polls the agent one
last time, so the server still takes calls until it is done, or for a short head start), then
``server.stop(grace)``, channels closed;
``stopped`` is set at the end. Whatever only this worker held when it unregistered is recorded
as lost by the AMM, and logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf.duration_pb2 import Duration

from amm.base.heap import HeapFreezer
from amm.base.metrics import MetricsEndpoint
from amm.base.serving import CHANNEL_OPTIONS, Served, bound_address, open_channel, serve
from amm.base.validation import address_problem, epoch_problem
from amm.v1 import control_pb2, control_pb2_grpc
from worker_agent import metrics
from worker_agent.advertise import advertised_address
from worker_agent.bulk import BulkServer, host_of
from worker_agent.config import AgentConfig
from worker_agent.confirm import KnownKey, Membership
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
#: Deadline of the UnregisterWorker call made when the agent stops. Generous for the same
#: reason: when many agents stop at once, the AMM answers the last of them seconds later (it
#: polls each once more first), and a call given up on may never reach it. With 0.5 s, 250
#: agents stopping together in ``benchmarks/bench_scale.py`` lost 100-250 unregistrations, and
#: those agents stayed listed as live until declared dead. An AMM that is down refuses at once;
#: only one that accepts the call and never answers holds the stop this long.
UNREGISTER_TIMEOUT = 5.0
#: How long the server keeps taking new calls while the agent unregisters: the AMM polls it once
#: more meanwhile, to record what is lost with it (a few ms when all is well). An AMM slower than
#: this goes by its last poll.
UNREGISTER_HEAD_START = 0.25
#: Keys named in a log line, at most.
KEYS_LOGGED = 20
#: How long a Put (or a read that keeps a replica) waits for an AMM that cannot be reached to
#: come back before it fails UNAVAILABLE: the agent asks the AMM before it stores a key it
#: lacks, and for a moment after an AMM restarts its channel is still backing off. A restart
#: takes a second or two (``AMM_RECONNECT_BACKOFF`` more to redial).
AMM_RECONNECT_WAIT = 5.0
#: The longest pause between two attempts to dial the AMM, in milliseconds (gRPC's default
#: grows to 120 s): an AMM back after a long outage is dialled again within a second.
AMM_RECONNECT_BACKOFF_MS = 1000
#: The longest pause between two registration attempts while a drain waits for one, in seconds.
DRAIN_REGISTER_BACKOFF = 0.25
#: The least pause before a refused LookupKeys is sent again, in seconds.
RECONNECT_PAUSE = 0.05
#: Seconds between two ``Node.housekeeping`` calls (expired tombstones, memory freed).
HOUSEKEEPING_INTERVAL = 5.0
#: Keys held from which the agent keeps its heap frozen (``amm.base.heap``): a full garbage
#: collection of an agent holding 100k keys held its loop for 30-40 ms of CPU every second or
#: so while it dropped them (a HoldsKeys or a poll waited as long); below, collections are short.
FREEZE_FROM = 10_000
#: Deadline of a call that confirms an epoch or peers with the AMM (GetMembership). Generous:
#: an AMM planning a cycle of 100k keys answers control calls up to about 1 s late.
CONFIRM_TIMEOUT = 5.0


class _AmmLink:
    """The calls ``confirm`` makes to the AMM, over the agent's channel to it (``stub`` gives
    it, ``channel`` the channel, both None until the agent started)."""

    def __init__(
        self,
        address: str,
        stub: Callable[[], control_pb2_grpc.ActiveMemoryManagerAsyncStub | None],
        *,
        channel: Callable[[], grpc.aio.Channel | None] = lambda: None,
        lookup_timeout: float,
        reconnect_wait: float = AMM_RECONNECT_WAIT,
    ) -> None:
        self.address = address
        self._stub = stub
        self._channel = channel
        self._lookup_timeout = lookup_timeout
        self._reconnect_wait = reconnect_wait

    async def membership(self, epoch: int, version: int) -> Membership | None:
        amm = self._stub()
        if amm is None:
            raise Unavailable(f"no channel to the AMM at {self.address} yet")
        try:
            response = await amm.GetMembership(
                control_pb2.GetMembershipRequest(epoch=epoch, version=version),
                timeout=CONFIRM_TIMEOUT,
                wait_for_ready=True,  # an AMM that polls before it serves answers a moment later
            )
        except grpc.aio.AioRpcError as err:
            raise Unavailable(
                f"cannot ask the AMM at {self.address}: {err.code().name} {err.details() or ''}"
            ) from err
        if epoch_problem("epoch", response.epoch) is not None:
            raise Unavailable(f"the AMM at {self.address} answered epoch {response.epoch}")
        if response.unchanged:
            return None
        return Membership(response.epoch, response.version, frozenset(response.workers))

    async def lookup(
        self, keys: Sequence[Key], *, fresh: bool, storing: tuple[str, str] | None = None
    ) -> dict[Key, KnownKey]:
        amm = self._stub()
        if amm is None:
            raise Unavailable(f"no channel to the AMM at {self.address} yet")
        request = control_pb2.LookupKeysRequest(keys=keys, fresh=fresh)
        if storing is not None:
            request.storing.worker, request.storing.incarnation = storing
        loop = asyncio.get_running_loop()
        until = loop.time() + self._reconnect_wait
        while True:
            try:
                response = await amm.LookupKeys(request, timeout=self._lookup_timeout)
                break
            except grpc.aio.AioRpcError as err:
                left = until - loop.time()
                if err.code() is not grpc.StatusCode.UNAVAILABLE or left <= 0:
                    waited = (
                        f" (waited {self._reconnect_wait:g} s for it to come back)"
                        if err.code() is grpc.StatusCode.UNAVAILABLE
                        else ""
                    )
                    raise Unavailable(
                        f"cannot ask the AMM at {self.address} about {len(keys)} key(s): "
                        f"{err.code().name} {err.details() or ''}{waited}"
                    ) from err
            await self._reconnected(left)
        return {
            Key(k.key): KnownKey(k.size, k.checksum, tuple(k.holders), tuple(k.conflicting))
            for k in response.keys
        }

    async def _reconnected(self, within: float) -> None:
        """Wait up to ``within`` seconds for the channel to the AMM to connect again (a restarted
        AMM: the channel backs off before it redials); at least a short pause, so that a call
        refused on a channel that looks connected is not sent again at once."""
        channel = self._channel()
        pause = min(RECONNECT_PAUSE, within)
        if channel is None:
            await asyncio.sleep(pause)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.gather(channel.channel_ready(), asyncio.sleep(pause))


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
            amm=(
                _AmmLink(
                    config.amm,
                    lambda: self._amm,
                    channel=lambda: self._amm_channel,
                    lookup_timeout=config.fetch_timeout,
                )
                if config.amm
                else None
            ),
        )
        #: The metrics endpoint, when ``config.metrics_listen`` asks for one.
        self.metrics: MetricsEndpoint | None = (
            metrics.endpoint(
                self.node, config.metrics_listen, config.security, insecure=config.insecure
            )
            if config.metrics_listen
            else None
        )
        self._served: Served | None = None
        self._amm: control_pb2_grpc.ActiveMemoryManagerAsyncStub | None = None
        self._amm_channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False
        #: Set while registered: a drain begun between an AMM's restart and the re-registration
        #: waits for it rather than give up on what only this worker holds.
        self._registration = asyncio.Event()
        #: Set by a drain that waits for the registration: the next attempt goes at once, not
        #: after the backoff (seconds by then, when the AMM's restart took a while).
        self._register_now = asyncio.Event()
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
            interceptors=self.metrics.interceptors if self.metrics is not None else (),
            security=self.config.security,
            insecure=self.config.insecure,
        )
        if self.config.bulk and self.config.security is None:
            try:
                self.node.bulk = await BulkServer.start(
                    host_of(self.config.listen),
                    self.config.stream_idle_timeout,
                    self.config.max_bulk_senders,
                )
            except OSError as err:  # values then travel over gRPC, as with --no-bulk
                log.warning("no bulk port: %s", err)
        if self.metrics is not None:
            self.metrics.start()
        self.node.address = await asyncio.to_thread(
            advertised_address,
            bound_address(self.config.listen, self._served.port),
            self.config.advertise,
            self.config.amm,
        )
        problem = address_problem("the advertised address", self.node.address)
        if problem is not None:  # the AMM and every peer would refuse it
            raise OSError(f"{problem}; set --advertise HOST:PORT")
        self.node.sample_memory()
        self._spawn(self._sample_memory(), "agent memory sampler")
        self._spawn(self._close_when_asked(), "agent close watcher")
        if self.config.amm:
            # Its own subchannel pool: a confirmation refused while the AMM starts (it polls
            # before it serves) must not put other channels of this process into backoff.
            self._amm_channel = open_channel(
                self.config.amm,
                self.config.security,
                options=[
                    *CHANNEL_OPTIONS,
                    ("grpc.use_local_subchannel_pool", 1),
                    ("grpc.max_reconnect_backoff_ms", AMM_RECONNECT_BACKOFF_MS),
                ],
            )
            self._amm = control_pb2_grpc.ActiveMemoryManagerStub(self._amm_channel)
            self._spawn(self._register(self._amm), "agent registration")
        log.info(
            "agent %s serving on %s%s%s (incarnation %s)",
            self.node.name,
            self.address,
            " with mutual TLS" if self.config.security else "",
            f", bulk port {self.node.bulk.port}" if self.node.bulk is not None else "",
            self.incarnation,
        )

    async def stop(self) -> None:
        """Shut down; idempotent, and concurrent calls wait for the same shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(), name="agent stop")
        await asyncio.shield(self._stopping)

    async def drain(self, grace: float | None = None) -> bool:
        """Before a stop: have the AMM copy what only this worker holds elsewhere, waiting up to
        ``grace`` seconds (``drain_grace`` by default). True when nothing is lost by leaving now.

        The agent takes no new data meanwhile but keeps serving, so its keys can be copied from
        it. Whatever could not be copied is logged, by key; the AMM records it as lost once the
        agent unregisters (``stop``).
        """
        grace = self.config.drain_grace if grace is None else grace
        self.node.draining = True
        held = len(self.store)
        if not held:
            return True
        if self._amm is None or grace <= 0:
            log.warning("stopping without draining: %d key(s) held here", held)
            return False
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not self._registered:
            # Say the AMM just restarted: registering again takes a retry or two, sent now
            # rather than after the backoff. Half the grace at most, so that the AMM keeps the
            # other half to copy.
            self._register_now.set()
            try:
                async with asyncio.timeout(grace / 2):
                    await self._registration.wait()
            except TimeoutError:
                log.warning(
                    "not registered with %s: cannot drain; the %d key(s) held here that exist "
                    "nowhere else are lost",
                    self.config.amm,
                    held,
                )
                return False
            grace -= loop.time() - started
        channel = self._amm_channel
        if channel is not None and channel.get_state() is not grpc.ChannelConnectivity.READY:
            # An AMM that restarted a moment ago: our registration still stands (its state file
            # keeps us), but the channel saw the old one go and waits out a reconnect backoff. A
            # call now would fail UNAVAILABLE at once and lose what only we hold; wait for the
            # channel, half the grace at most.
            waited = loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace / 2):
                    await channel.channel_ready()
            grace -= loop.time() - waited
        log.info(
            "draining: asking %s to copy what only this worker holds elsewhere", self.config.amm
        )
        try:
            answer = await self._ask_drain(grace)
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.NOT_FOUND:
                return _could_not_drain(err)
            # The AMM no longer knows this worker: it was declared dead while frozen or cut off,
            # and the SIGTERM came before our registration loop noticed. What we hold may be
            # known nowhere else (put since the AMM's last poll), so register again now, which
            # hands the AMM our inventory, and ask once more: half the grace left at most.
            log.info("the AMM no longer knows this worker (%s): registering again", err.details())
            left = grace - (loop.time() - started)
            try:
                await self._register_once(within=left / 2)
                answer = await self._ask_drain(grace - (loop.time() - started))
            except grpc.aio.AioRpcError as again:
                return _could_not_drain(again)
        took = loop.time() - started
        if answer.drained:
            log.info("drained in %.1f s: every key held here has a copy on another worker", took)
            return True
        if not answer.unique_key_count:
            log.warning(
                "could not drain in %.1f s (%s), but no key is held only here: nothing is lost",
                took,
                answer.reason,
            )
            return False
        log.warning(
            "could not drain in %.1f s (%s): %d key(s) held only here are lost when it exits%s",
            took,
            answer.reason,
            answer.unique_key_count,
            _keys(answer.unique_keys, answer.unique_key_count),
        )
        return False

    async def _stop(self) -> None:
        self.node.closing = True
        if self._served is not None:
            await self._served.set_serving(False)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.node.shutdown.set()  # our directive streams end themselves (grpc/grpc#37239)
        # The AMM polls us once more while we unregister, to record what is lost: the server
        # takes new calls until then (for a while). Each may take its whole deadline (an AMM or
        # clients that do not answer): not in turn.
        unregistering = asyncio.create_task(self._unregister(), name="agent unregister")
        await asyncio.wait([unregistering], timeout=UNREGISTER_HEAD_START)
        await asyncio.gather(unregistering, self._stop_server())
        await self.node.close()
        if self._amm_channel is not None:
            await self._amm_channel.close(None)
        log.info("agent %s stopped", self.node.address or "(never started)")
        self.stopped.set()

    async def _stop_server(self) -> None:
        if self.metrics is not None:
            await asyncio.gather(self.metrics.stop(), self._stop_grpc())
        else:
            await self._stop_grpc()

    async def _stop_grpc(self) -> None:
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
        """Keep the unmanaged-memory window filled even when nobody polls; keep a big store out
        of full garbage collections (``FREEZE_FROM``); and now and then let go of what the
        agent no longer needs (``Node.housekeeping``)."""
        loop = asyncio.get_running_loop()
        tidied = loop.time()
        heap = HeapFreezer()
        try:
            while True:
                await asyncio.sleep(self.config.memory_interval)
                self.node.sample_memory()
                heap.freeze(big=len(self.node.store) >= FREEZE_FROM)
                if loop.time() - tidied >= HOUSEKEEPING_INTERVAL:
                    tidied = loop.time()
                    self.node.housekeeping()
        finally:
            heap.thaw()  # an agent run in a bigger process leaves it as it found it

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
            try:
                response = await amm.RegisterWorker(
                    self._registration_request(),
                    timeout=max(REGISTER_TIMEOUT, self.config.register_backoff_max),
                )
            except grpc.aio.AioRpcError as err:
                self._registered = False
                self._registration.clear()
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
                await self._backoff(delay)
                delay = min(delay * 2, self.config.register_backoff_max)
                if self.node.draining:
                    delay = min(delay, DRAIN_REGISTER_BACKOFF)
                continue
            if not self._adopt(response):
                await asyncio.sleep(self.config.register_backoff_max)
                continue
            attempts, delay = 0, 0.1
            if response.epoch != epoch:
                log.info("registered with %s (epoch %d)", self.config.amm, response.epoch)
                epoch = response.epoch
            # Clamped: an absurd interval must neither overflow nor silence re-registration.
            interval = min(max(response.interval.ToNanoseconds() / 1e9, 0.05), 3600.0)
            await self._until_silent(SILENCE_INTERVALS * interval)
            # Also routine while the AMM runs no cycles (it polls only then): hence DEBUG.
            log.debug("not polled for %.2f s; registering again", SILENCE_INTERVALS * interval)

    async def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds before the next registration attempt, or less: until a drain
        wants the registration now."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._register_now.wait()
        self._register_now.clear()

    async def _until_silent(self, silence: float) -> None:
        """Return once ``silence`` seconds pass without a poll."""
        while True:
            self.node.polled.clear()
            try:
                async with asyncio.timeout(silence):
                    await self.node.polled.wait()
            except TimeoutError:
                return

    async def _ask_drain(self, grace: float) -> control_pb2.DrainWorkerResponse:
        """The AMM's ``DrainWorker`` for this worker, answered within ``grace`` seconds."""
        assert self._amm is not None
        # The AMM answers a little before our deadline, with what it knows then.
        limit = grace - min(2.0, grace / 4)
        answer: control_pb2.DrainWorkerResponse = await self._amm.DrainWorker(
            control_pb2.DrainWorkerRequest(address=self.address, timeout=_duration(limit)),
            timeout=grace,
            wait_for_ready=True,
        )
        return answer

    def _registration_request(self) -> control_pb2.RegisterWorkerRequest:
        # The newest epoch confirmed lets a freshly started AMM move its epoch past it.
        return control_pb2.RegisterWorkerRequest(
            address=self.address,
            name=self.node.name,
            incarnation=self.incarnation,
            epoch=self.node.newest_epoch,
            zone=self.config.zone,
        )

    async def _register_once(self, within: float) -> None:
        """One ``RegisterWorker`` now, outside the registration loop (which registers again on
        its own once the AMM's polls stop; a registration repeated is harmless)."""
        assert self._amm is not None
        self._adopt(await self._amm.RegisterWorker(self._registration_request(), timeout=within))

    def _adopt(self, response: control_pb2.RegisterWorkerResponse) -> bool:
        """Take a registration's answer: registered, under the AMM's epoch; False (and nothing
        taken) for an epoch out of bounds."""
        if epoch_problem("epoch", response.epoch) is not None:
            log.warning("the AMM at %s answered epoch %d: ignored", self.config.amm, response.epoch)
            return False
        self._registered = True
        self._registration.set()
        self.node.observe_epoch(response.epoch)
        self.node.registered_epoch = response.epoch
        return True

    async def _unregister(self) -> None:
        if self._amm is None or not self._registered:
            return
        try:
            answer = await self._amm.UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=self.address),
                timeout=UNREGISTER_TIMEOUT,
            )
        except grpc.aio.AioRpcError as err:
            log.warning("could not unregister from %s: %s", self.config.amm, err.code().name)
            return
        if answer.lost_key_count:
            log.warning(
                "unregistered: %s recorded %d key(s) held only here as lost%s",
                self.config.amm,
                answer.lost_key_count,
                _keys(answer.lost_keys, answer.lost_key_count),
            )


def _could_not_drain(err: grpc.aio.AioRpcError) -> bool:
    log.warning(
        "could not drain (%s: %s): the keys held only here are lost when it exits",
        err.code().name,
        err.details(),
    )
    return False


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(max(1, round(seconds * 1e9)))
    return duration


def _keys(listed: Sequence[str], count: int) -> str:
    """``: 'a', 'b' and 3 more`` for a log line."""
    if not listed:
        return ""
    shown = ", ".join(repr(k) for k in listed[:KEYS_LOGGED])
    more = count - min(len(listed), KEYS_LOGGED)
    return f": {shown}" + (f" and {more} more" if more > 0 else "")


def _report_exit(task: asyncio.Task[None]) -> None:
    """Background tasks run until cancelled; any other end is a bug worth a log line."""
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=err)
        return
    log.error("background task %s exited unexpectedly", task.get_name())
