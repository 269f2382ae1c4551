"""The Python client: ``AsyncClient`` over ``grpc.aio`` and ``Client``, its blocking twin.

``AsyncClient`` talks to the AMM's control API for the cluster-wide view (who has what, status,
start/stop) and straight to the worker agents for data (put, get, pin), as a Dask client talks to
the scheduler and to workers. ``Client`` runs an ``AsyncClient`` on a private event loop in a
daemon thread; its methods are generated from the async ones by ``amm.blocking.forward``, so
there is one body per verb. Every failure reaches the caller as ``AmmError`` with a gRPC status
code; an address that cannot be reached is named in the message. Not covered here: policies,
directives and agent registration, which belong to the service and the agents.

With ``security`` (``Security.from_dir("certs/")``, an operator by default) every channel is TLS:
the AMM must hold a certificate for the host dialled, and each agent one of the cluster CA, whatever
address it advertises. A bearer token (``Security.from_dir(d, identity=None, token=...)``) reaches
the AMM's token port only: agents take certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar, cast

import grpc

from amm import batches
from amm.base.checksum import checksum
from amm.base.security import Role, Security
from amm.base.serving import open_channel
from amm.base.streams import (
    PUT_ACCEPTED_METADATA,
    Assembly,
    Overflow,
    ValueStreams,
    framed_chunks,
)
from amm.base.units import parse_duration
from amm.blocking import Blocking, LoopThread, forward
from amm.errors import AmmError
from amm.models import (
    CycleReport,
    Event,
    EventGap,
    GoalChange,
    LostKey,
    Prefetched,
    PutManyResult,
    ReplicationGoal,
    RetirementResult,
    Status,
    WorkerInfo,
    address_key,
    cycle_from_proto,
    event_from_proto,
    goal_from_proto,
    lost_from_proto,
    retirement_from_proto,
    sort_addresses,
    status_from_proto,
    worker_from_proto,
)
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from amm.v1.agent_pb2_grpc import WorkerAgentAsyncStub
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub

__all__ = ["AmmControl", "AsyncAmmControl", "AsyncClient", "Client"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
CHUNK_SIZE = 4 * 1024 * 1024
"""Size of the chunks ``put`` sends: as the agents' default (``worker_agent.config``)."""
AMM_ROLE = "the AMM"
RUN_ONCE_TIMEOUT = 60.0
"""Least seconds ``run_once`` waits: well above the AMM's default directive timeout (30 s)."""
MAX_DURATION_SECONDS = 315_576_000_000
"""The longest ``google.protobuf.Duration`` (10,000 years)."""
MAX_CALL_DEADLINE = 1e9
"""Seconds: gRPC keeps deadlines in 64-bit nanoseconds, so one much further away overflows."""
LEGACY_PUTS_AT_ONCE = 32
LOST_PAGE = 10_000
"""Lost keys ``lost_keys`` asks for at a time."""
"""Puts in flight to one agent that does not serve PutMany (``put_many``'s fallback)."""

T = TypeVar("T")


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await ``calls`` concurrently and every one of them to the end; then raise the first
    failure, if any. Unlike a bare ``gather``, no call is left running after a failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def _total(tallies: Sequence[PutManyResult], workers: Sequence[str]) -> PutManyResult:
    return PutManyResult(
        created=sum(t.created for t in tallies),
        unchanged=sum(t.unchanged for t in tallies),
        nbytes=sum(t.nbytes for t in tallies),
        workers=tuple(workers),
    )


def _as_list(items: str | Sequence[str] | None) -> list[str]:
    if items is None:
        return []
    return [items] if isinstance(items, str) else list(items)


@contextlib.contextmanager
def _rpc(role: str, address: str) -> Iterator[None]:
    """Turn a failed call to ``role`` at ``address`` into ``AmmError``.

    The address is named when it could not be reached or did not answer in time, and always for
    a worker, since data calls go to one worker among many. An UNAVAILABLE status can also come
    from a reachable server (say, an agent whose peers are all down): its details tell which.
    """
    try:
        yield
    except grpc.aio.AioRpcError as err:
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"{role} at {address} did not answer in time ({details})"
        elif code == grpc.StatusCode.UNAVAILABLE or role != AMM_ROLE:
            details = f"{role} at {address}: {details}"
        # The gRPC error says nothing more than the message; it stays as ``__context__``.
        raise AmmError(code, details) from None


#: How long a Put waits for the agent to accept its header before sending the chunks anyway (an
#: agent older than ``PUT_ACCEPTED_METADATA`` does not announce it), in seconds. Longer than an
#: agent may take to judge a header (it waits up to 5 s for a restarting AMM), so that a refusal
#: is never taken for silence; an agent that stayed silent is not waited for again.
PUT_ACCEPT_WAIT = 15.0


class AsyncAmmControl:
    """``client.amm``: start, stop and drive the AMM's cycles."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def start(self) -> None:
        """Run cycles every interval (idempotent)."""
        stub = self._client._amm_stub()
        with self._client._amm_rpc():
            await stub.Start(control_pb2.StartRequest(), timeout=self._client.timeout)

    async def stop(self) -> None:
        """Stop running cycles (idempotent)."""
        stub = self._client._amm_stub()
        with self._client._amm_rpc():
            await stub.Stop(control_pb2.StopRequest(), timeout=self._client.timeout)

    async def running(self) -> bool:
        """Whether cycles run every interval."""
        stub = self._client._amm_stub()
        with self._client._amm_rpc():
            reply = await stub.Running(control_pb2.RunningRequest(), timeout=self._client.timeout)
        return reply.running

    async def run_once(self, wait: bool = True, dry_run: bool = False) -> CycleReport:
        """Run one cycle now, even while stopped; ``wait`` for every directive's outcome.

        With ``dry_run`` the AMM polls and plans but sends nothing: the report lists the
        directives the policies would produce, each with its ``policy`` and ``policy_reason``.

        This one call gets ``max(timeout, RUN_ONCE_TIMEOUT)`` (60 s) to answer: with ``wait`` the
        AMM answers only once each directive has an outcome or has timed out, and its directive
        timeout (30 s by default) matches the client's default timeout, which would cut a
        legitimate wait short with ``DEADLINE_EXCEEDED``.
        """
        stub = self._client._amm_stub()
        with self._client._amm_rpc():
            reply = await stub.RunOnce(
                control_pb2.RunOnceRequest(wait=wait, dry_run=dry_run),
                timeout=max(self._client.timeout, RUN_ONCE_TIMEOUT),
            )
        return cycle_from_proto(reply.cycle)


class AsyncClient:
    """Asynchronous client of an AMM and its workers; ``async with`` closes its channels."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 30.0,
        chunk_size: int = CHUNK_SIZE,
        security: Security | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.address = address
        self.security = security
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.amm = AsyncAmmControl(self)
        self._channel: grpc.aio.Channel | None = None
        self._stub: ActiveMemoryManagerAsyncStub | None = None
        self._agents: dict[str, tuple[grpc.aio.Channel, WorkerAgentAsyncStub, ValueStreams]] = {}
        # Agents that did not announce an accepted Put header (older ones): not waited for again.
        self._silent: set[str] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncClient amm={self.address}{' tls' if self.security else ''}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; idempotent. The client cannot be used afterwards."""
        self._closed = True
        channels = [channel for channel, _, _ in self._agents.values()]
        if self._channel is not None:
            channels.append(self._channel)
        self._agents.clear()
        self._channel, self._stub = None, None
        for channel in channels:
            await channel.close(None)

    def _check_open(self) -> None:
        if self._closed:
            raise AmmError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")

    def _amm_stub(self) -> ActiveMemoryManagerAsyncStub:
        self._check_open()
        if self._stub is None:
            self._channel = open_channel(self.address, self.security)
            self._stub = control_pb2_grpc.ActiveMemoryManagerStub(self._channel)
        return self._stub

    def _agent(self, address: str) -> tuple[grpc.aio.Channel, WorkerAgentAsyncStub, ValueStreams]:
        self._check_open()
        if address not in self._agents:
            channel = open_channel(address, self.security, expect=Role.AGENT)
            self._agents[address] = (
                channel,
                agent_pb2_grpc.WorkerAgentStub(channel),
                ValueStreams(channel),
            )
        return self._agents[address]

    def _agent_stub(self, address: str) -> WorkerAgentAsyncStub:
        return self._agent(address)[1]

    def _value_streams(self, address: str) -> ValueStreams:
        """Put, Get and Fetch of the agent at ``address``, chunks as bytes; ``amm.base.streams``."""
        return self._agent(address)[2]

    def _amm_rpc(self) -> contextlib.AbstractContextManager[None]:
        return _rpc(AMM_ROLE, self.address)

    async def has_what(
        self, workers: str | Sequence[str] | None = None, *, fresh: bool = True
    ) -> dict[str, tuple[str, ...]]:
        """Keys held by each worker; all workers, ordered by address, when ``workers`` is None."""
        asked = _as_list(workers)
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.HasWhat(
                control_pb2.HasWhatRequest(workers=asked, fresh=fresh), timeout=self.timeout
            )
        entries = list(reply.entries)
        if not asked:
            entries.sort(key=lambda entry: address_key(entry.worker))
        return {entry.worker: tuple(entry.keys) for entry in entries}

    async def who_has(
        self, keys: str | Sequence[str] | None = None, *, fresh: bool = True
    ) -> dict[str, tuple[str, ...]]:
        """Workers holding each key (ordered by address); every key when ``keys`` is None.

        A key no worker holds is ``NOT_FOUND``; ``UNAVAILABLE`` instead when, ``fresh``, a worker
        asked did not answer in time: it may hold the key, so ask again."""
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.WhoHas(
                control_pb2.WhoHasRequest(keys=_as_list(keys), fresh=fresh), timeout=self.timeout
            )
        return {entry.key: tuple(sort_addresses(list(entry.workers))) for entry in reply.entries}

    async def workers(self, fresh: bool = False) -> list[WorkerInfo]:
        """The registered workers, ordered by address."""
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.ListWorkers(
                control_pb2.ListWorkersRequest(fresh=fresh), timeout=self.timeout
            )
        found = [worker_from_proto(w) for w in reply.workers]
        return sorted(found, key=lambda w: address_key(w.address))

    async def status(self) -> Status:
        """The AMM's configuration, epoch, last cycle and cluster totals."""
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.GetStatus(control_pb2.GetStatusRequest(), timeout=self.timeout)
        return status_from_proto(reply)

    async def events(
        self,
        after: int | Event | None = None,
        *,
        kinds: str | Sequence[str] | None = None,
        follow: bool = False,
        incarnation: str = "",
    ) -> AsyncGenerator[Event | EventGap, None]:
        """The AMM's events, oldest first: those it retains after ``after`` (the ``seq`` of the
        last event seen, or that event itself; None: every event retained), then with ``follow``
        each new one as the AMM records it, until the caller stops iterating.

        An ``EventGap`` stands for events that will never come: older than the AMM retains, or
        dropped because this reader fell behind; ``restarted`` when ``after`` came from an earlier
        run of the AMM (pass the event, or its ``incarnation``, to have that noticed). ``kinds``
        keeps only those kinds. A follower gets ``UNAVAILABLE`` when the AMM shuts down.
        """
        seq = after.seq if isinstance(after, Event) else after
        if isinstance(after, Event):
            incarnation = after.incarnation
        if seq is not None and not 0 <= seq < 2**64:
            raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, f"after out of range: {seq}")
        request = control_pb2.WatchEventsRequest(
            after=seq, incarnation=incarnation, kinds=_as_list(kinds), follow=follow
        )
        stub = self._amm_stub()
        call = stub.WatchEvents(request, timeout=None if follow else self.timeout)
        try:
            with self._amm_rpc():
                async for reply in call:
                    if reply.missed or reply.restarted:
                        yield EventGap(reply.missed, reply.restarted)
                    if reply.HasField("event"):
                        yield event_from_proto(reply.event)
        finally:
            call.cancel()

    async def forget(self, keys: str | Sequence[str]) -> int:
        """Delete keys on every worker that holds them; returns the number of replicas deleted."""
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.Forget(
                control_pb2.ForgetRequest(keys=_as_list(keys)), timeout=self.timeout
            )
        return reply.replicas_deleted

    async def replicate(self, keys: str | Sequence[str], n: int | None = None) -> GoalChange:
        """Keep ``n`` copies of each key, every cycle from now on; ``n=None`` keeps one on every
        worker, including workers that join later.

        Not a one-off copy: a goal the AMM tracks (and persists), recreating copies lost with
        their workers. ``n=1`` removes the goal. The keys must exist (``NOT_FOUND`` lists those
        that do not); ``n=0`` is ``INVALID_ARGUMENT``.
        """
        if n is not None and not 0 <= n < 2**32:
            raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, f"n out of range: {n}")
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.Replicate(
                control_pb2.ReplicateRequest(keys=_as_list(keys), n=n), timeout=self.timeout
            )
        return GoalChange(goals_set=reply.goals_set, goals_removed=reply.goals_removed)

    async def goals(
        self, keys: str | Sequence[str] | None = None, *, fresh: bool = True
    ) -> list[ReplicationGoal]:
        """The replication goals of ``keys`` (every goal when None), ordered by key, each with
        its target and live copies; a key without a goal is ``NOT_FOUND``. Live copies are
        counted after a poll of every agent (as ``who_has``), unless ``fresh`` is False."""
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.ListGoals(
                control_pb2.ListGoalsRequest(keys=_as_list(keys), fresh=fresh),
                timeout=self.timeout,
            )
        return [goal_from_proto(g) for g in reply.goals]

    async def lost_keys(
        self, keys: str | Sequence[str] | None = None, *, limit: int | None = None
    ) -> list[LostKey]:
        """The keys known to be lost, ordered by key (those of ``keys`` that are lost, or every
        one), at most ``limit``: each with the worker that held its last copy, when and how it
        was lost, and whether it has a goal. A key leaves the list once a worker holds it again
        or it is forgotten; the AMM keeps the list across its restarts."""
        if limit is not None and limit < 1:
            raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be >= 1, not {limit}")
        stub = self._amm_stub()
        found: list[LostKey] = []
        after = ""
        while limit is None or len(found) < limit:
            page = LOST_PAGE if limit is None else min(LOST_PAGE, limit - len(found))
            request = control_pb2.ListLostRequest(keys=_as_list(keys), limit=page, after=after)
            with self._amm_rpc():
                reply = await stub.ListLost(request, timeout=self.timeout)
            found += [lost_from_proto(k) for k in reply.lost]
            if len(reply.lost) < page:
                break
            after = reply.lost[-1].key
        return found

    async def retire_workers(
        self,
        workers: str | Sequence[str] | None = None,
        *,
        n: int | None = None,
        close: bool = True,
        timeout: float | str | None = None,  # noqa: ASYNC109 - the retirement's, not the call's
    ) -> list[RetirementResult]:
        """Retire ``workers`` gracefully, or the ``n`` cheapest to retire (idle and holding the
        fewest bytes first), and return how each retirement ended, ordered by address.

        A retiring worker receives no new replicas; what only it holds is copied elsewhere, the
        rest dropped from it; once it holds nothing it is RETIRED and, with ``close``, its agent
        shuts down. A retirement is abandoned, the worker back to its previous status and nothing
        lost, when no other worker can take its data or ``timeout`` (seconds or ``"30s"``)
        passes; ``reason`` says why. The call returns once every retirement ended: it has no
        deadline of its own without ``timeout``, and ``timeout`` plus the client's otherwise.
        """
        asked = _as_list(workers)
        if asked and n is not None:
            raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, "give workers or n, not both")
        if n is not None and not 0 <= n < 2**32:
            raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, f"n out of range: {n}")
        request = control_pb2.RetireWorkersRequest(workers=asked, n=n, close=close)
        deadline = None
        if timeout is not None:
            try:
                seconds = parse_duration(timeout)
            except ValueError as err:
                raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            if not (math.isfinite(seconds) and seconds <= MAX_DURATION_SECONDS):
                raise AmmError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"timeout out of range: {timeout!r}"
                )
            request.timeout.FromNanoseconds(round(seconds * 1e9))
            # Beyond what gRPC can express, a deadline would expire at once: then none.
            if seconds + self.timeout <= MAX_CALL_DEADLINE:
                deadline = seconds + self.timeout
        stub = self._amm_stub()
        with self._amm_rpc():
            reply = await stub.RetireWorkers(request, timeout=deadline)
        return [retirement_from_proto(r) for r in reply.results]

    async def put(self, key: str, value: bytes, workers: str | Sequence[str] | None = None) -> None:
        """Store ``value`` under ``key`` on ``workers``, one address or several (one after another).

        With ``workers=None`` the value goes to the running worker with the least managed memory;
        an empty ``workers`` is ``INVALID_ARGUMENT``, not a put that stores nothing. Storing the
        same content again is a no-op; different content under an existing key fails with
        ``ALREADY_EXISTS``.
        """
        if workers is None:
            targets = [await self._least_loaded(key)]
        else:
            targets = _as_list(workers)
            if not targets:
                raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, "no workers given")
        digest = checksum(value)
        for address in targets:
            await self._put_one(address, key, value, digest)

    async def put_many(
        self,
        items: Mapping[str, batches.Data] | Iterable[tuple[str, batches.Data]],
        workers: str | Sequence[str] | None = None,
    ) -> PutManyResult:
        """Store many values at once: ``items`` is a mapping or pairs of ``(key, value)``.

        ``workers`` is one address or several, each of which gets every value (a broadcast,
        to all of them at once, as Dask's ``scatter(broadcast=True)``), or None: the values are
        spread round-robin over the running workers, the least loaded first (as ``scatter``).
        The rules of ``put`` hold for each value; values travel in messages of about 4 MiB
        (``PutMany``), a value too large for one goes through ``Put``, and an agent that does not
        serve ``PutMany`` gets one ``Put`` per value.

        An agent stores each message whole or not at all: when the call fails (``AmmError``
        naming the worker; ``ALREADY_EXISTS`` for different content under a key), values of the
        messages before it stay stored.
        """
        try:
            values = batches.items_of(items)
        except TypeError as err:
            raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        shares: list[tuple[tuple[str, ...], list[batches.Item]]]
        if workers is None:
            if not values:
                return PutManyResult(0, 0, 0, ())
            targets = [w.address for w in await self._running_workers(f"{len(values)} values")]
            shares = [((address,), []) for address in targets]
            # By key, not by item: a key given twice goes to one worker, which judges the two.
            slots: dict[str, int] = {}
            for item in values:
                slot = slots.setdefault(item.key, len(slots))
                shares[slot % len(targets)][1].append(item)
        else:
            targets = list(dict.fromkeys(_as_list(workers)))
            if not targets:
                raise AmmError(grpc.StatusCode.INVALID_ARGUMENT, "no workers given")
            shares = [(tuple(targets), values)]
        tallies = await _all(
            self._put_values(addresses, share) for addresses, share in shares if share
        )
        return _total(tallies, [a for addresses, share in shares if share for a in addresses])

    async def _put_values(
        self, addresses: Sequence[str], values: Sequence[batches.Item]
    ) -> PutManyResult:
        """Every value on every one of ``addresses``, one batch at a time, the workers at once."""
        legacy: set[str] = set()
        small, large = batches.split(values)
        tallies: list[PutManyResult] = []
        for batch in batches.batches(small):
            tallies += await _all(self._put_batch(a, batch, legacy) for a in addresses)
        for item in large:
            tallies += await _all(self._put_item(a, item) for a in addresses)
        return _total(tallies, addresses)

    async def _put_batch(
        self, address: str, batch: batches.Batch, legacy: set[str]
    ) -> PutManyResult:
        """One PutMany call; an agent that answers UNIMPLEMENTED (it does not report the
        feature "put-batches") joins ``legacy`` and gets one Put per value from then on."""
        if address not in legacy:
            stub = self._agent_stub(address)
            try:
                with _rpc("worker", address):
                    reply = await stub.PutMany(iter(batch.messages), timeout=self.timeout)
                return PutManyResult(reply.created, reply.unchanged, reply.bytes, (address,))
            except AmmError as err:
                if err.status != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                legacy.add(address)
        tallies: list[PutManyResult] = []
        for start in range(0, len(batch.items), LEGACY_PUTS_AT_ONCE):
            some = batch.items[start : start + LEGACY_PUTS_AT_ONCE]
            tallies += await _all(self._put_item(address, item) for item in some)
        return _total(tallies, [address])

    async def _put_item(self, address: str, item: batches.Item) -> PutManyResult:
        reply = await self._put_one(address, item.key, item.data, item.checksum)
        if reply.created:
            return PutManyResult(1, 0, reply.size, (address,))
        return PutManyResult(0, 1, 0, (address,))

    async def _running_workers(self, what: str) -> list[WorkerInfo]:
        """The running workers, least managed memory first; FAILED_PRECONDITION when none."""
        running = [w for w in await self.workers(fresh=True) if w.status == "running"]
        if not running:
            raise AmmError(
                grpc.StatusCode.FAILED_PRECONDITION, f"no running worker to put {what} on"
            )
        return sorted(running, key=lambda w: (w.managed_bytes, address_key(w.address)))

    async def _least_loaded(self, key: str) -> str:
        return (await self._running_workers(repr(key)))[0].address

    async def _put_one(
        self, address: str, key: str, value: bytes, digest: str
    ) -> agent_pb2.PutResponse:
        """The header, then, once the agent accepted it (``PUT_ACCEPTED_METADATA``), the chunks.

        A refusal of the header (over the memory limit, say) is thus heard with no write in
        flight: grpc.aio reports a write that fails because the call ended as ``INTERNAL:
        Internal error from Core``, not with the agent's status (grpc/grpc#36066). An agent that
        does not announce acceptance (an older one) gets the chunks after ``PUT_ACCEPT_WAIT``,
        and at once from then on.
        """
        header = agent_pb2.PutHeader(key=key, size=len(value), checksum=digest)
        streams = self._value_streams(address)
        with _rpc("worker", address):
            call = streams.put(timeout=self.timeout)  # type: ignore[call-arg]  # written below
            await call.write(agent_pb2.PutRequest(header=header))
            accepted = asyncio.ensure_future(call.initial_metadata())
            wait = 0.0 if address in self._silent else PUT_ACCEPT_WAIT
            try:
                metadata = await asyncio.wait_for(asyncio.shield(accepted), wait)
            except TimeoutError:
                metadata = None  # an older agent: it answers only at the end
                self._silent.add(address)
            finally:
                accepted.cancel()
            if metadata is not None and PUT_ACCEPTED_METADATA not in tuple(metadata):
                return await call  # refused: the agent's status, nothing in flight
            for chunk in framed_chunks(value, self.chunk_size):
                await call.write(chunk)
            await call.done_writing()
            return await call

    async def get(self, key: str, worker: str | None = None) -> bytes:
        """The value of ``key``, read from ``worker`` or, when None, from a current holder.

        A worker that lacks the key fetches it from a holder and keeps a replica. The data is
        checked against the size and checksum the worker announced (``DATA_LOSS`` otherwise).
        Without ``worker``, the holders the AMM lists are tried in order, and the next one is
        asked when a holder

        1. cannot be reached (``UNAVAILABLE``): it may have died since the AMM polled it;
        2. answers ``NOT_FOUND``: it dropped the key since (the AMM, or a forget, removed it).

        When every holder fails so, the last error is raised: ``NOT_FOUND`` if all said so.
        """
        if worker is not None:
            return await self._get_one(worker, key)
        holders = (await self.who_has([key], fresh=True)).get(key, ())
        if not holders:
            raise AmmError(grpc.StatusCode.NOT_FOUND, f"no worker holds {key!r}")
        failures: list[AmmError] = []
        for address in holders:
            try:
                return await self._get_one(address, key)
            except AmmError as err:
                if err.status not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise
                failures.append(err)
        raise failures[-1]

    async def _get_one(self, address: str, key: str) -> bytes:
        streams = self._value_streams(address)
        header: types_pb2.ValueHeader | None = None
        received: Assembly | None = None

        def lost(what: str) -> AmmError:
            return AmmError(grpc.StatusCode.DATA_LOSS, f"{key!r} from {address}: {what}")

        try:
            with _rpc("worker", address):
                call = streams.get(agent_pb2.GetRequest(key=key), timeout=self.timeout)
                async for message in call:
                    if received is None:
                        if isinstance(message, memoryview) or not message.HasField("header"):
                            raise lost("sent without a header")
                        header = message.header
                        received = Assembly(header.size)
                        continue
                    if not isinstance(message, memoryview):
                        raise lost("a message after the header holds no chunk")
                    try:
                        await received.add(message)
                    except Overflow as err:
                        raise lost(str(err)) from None
            if received is None or header is None:
                raise AmmError(grpc.StatusCode.DATA_LOSS, f"{address} sent nothing for {key!r}")
            if received.received != header.size:
                raise lost(f"received {received.received} bytes, announced {header.size}")
            data, digest = await received.finish()
            if digest != header.checksum:
                raise lost(f"received checksum {digest}, announced {header.checksum}")
            return data
        finally:
            if received is not None:
                received.abandon()

    async def prefetch(
        self, key: str, worker: str, *, sources: Sequence[str] = (), pin: bool = False
    ) -> Prefetched:
        """Make ``worker`` hold ``key`` as a read through it would, without receiving the value.

        A worker that lacks the key fetches it from ``sources`` (or, when empty, the holders the
        AMM names) and keeps the replica, as a Dask worker gathers a task's input; the value
        itself never travels to this client: the call ends once the worker sent the header.
        ``fetched`` tells whether the worker copied the key from a peer for this call. With
        ``pin``, the worker pins the key before it answers (no drop can come in between; unpin
        it later); ``pins`` is then the pin count, 0 from an agent too old to pin on a read.
        """
        stub = self._agent_stub(worker)
        request = agent_pb2.GetRequest(key=key, sources=list(sources), pin=pin)
        with _rpc("worker", worker):
            call = stub.Get(request, timeout=self.timeout)
            first: agent_pb2.GetResponse | None = None
            try:
                async for message in call:
                    first = message
                    break
            finally:
                call.cancel()
        if first is None or not first.HasField("header"):
            raise AmmError(grpc.StatusCode.DATA_LOSS, f"{worker} sent {key!r} without a header")
        header = first.header
        return Prefetched(
            key=key, worker=worker, size=header.size, fetched=header.replicated, pins=header.pins
        )

    async def pin(self, key: str, worker: str) -> int:
        """Pin ``key`` on ``worker`` so it is never dropped there; returns the pin count."""
        stub = self._agent_stub(worker)
        with _rpc("worker", worker):
            reply = await stub.Pin(agent_pb2.PinRequest(key=key), timeout=self.timeout)
        return reply.pins

    async def unpin(self, key: str, worker: str) -> int:
        """Release one pin on ``key`` at ``worker``; returns the pins still held."""
        stub = self._agent_stub(worker)
        with _rpc("worker", worker):
            reply = await stub.Unpin(agent_pb2.UnpinRequest(key=key), timeout=self.timeout)
        return reply.pins


async def _next(stream: AsyncIterator[T]) -> T | None:
    """The next item of ``stream``, None at its end (a coroutine, for ``LoopThread.run``)."""
    return await anext(stream, None)


class AmmControl(Blocking[AsyncAmmControl]):
    """``client.amm``: start, stop and drive the AMM's cycles.

    It holds its ``Client``: in ``Client(address).amm.start()`` nothing else does, and a client
    collected in between would have closed its loop under the call.
    """

    def __init__(self, target: AsyncAmmControl, portal: LoopThread, client: Client) -> None:
        super().__init__(target, portal)
        self._client = client

    start = forward(AsyncAmmControl.start)
    stop = forward(AsyncAmmControl.stop)
    running = forward(AsyncAmmControl.running)
    run_once = forward(AsyncAmmControl.run_once)


class Client(Blocking[AsyncClient]):
    """Blocking client of an AMM and its workers; the same methods as ``AsyncClient``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 30.0,
        chunk_size: int = CHUNK_SIZE,
        security: Security | None = None,
    ) -> None:
        target = AsyncClient(address, timeout=timeout, chunk_size=chunk_size, security=security)
        portal = LoopThread()
        super().__init__(target, portal)
        self.amm = AmmControl(target.amm, portal, self)
        self._finalizer = weakref.finalize(self, portal.close, target.close)

    @property
    def address(self) -> str:
        return self._target.address

    @property
    def security(self) -> Security | None:
        return self._target.security

    def __repr__(self) -> str:
        return f"<Client amm={self.address}{' tls' if self.security else ''}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and stop the private loop; idempotent."""
        self._finalizer()

    def events(
        self,
        after: int | Event | None = None,
        *,
        kinds: str | Sequence[str] | None = None,
        follow: bool = False,
        incarnation: str = "",
    ) -> Iterator[Event | EventGap]:
        """``AsyncClient.events`` as a blocking iterator: each item is waited for on the
        client's loop; leaving the loop early (``break``, Ctrl-C) ends the stream."""
        stream = self._target.events(after, kinds=kinds, follow=follow, incarnation=incarnation)
        try:
            while True:
                try:
                    item = self._portal.call(_next, stream)
                except AmmError as err:
                    raise err.with_traceback(None) from None
                if item is None:
                    return
                yield item
        finally:
            with contextlib.suppress(Exception):
                self._portal.call(stream.aclose)

    has_what = forward(AsyncClient.has_what)
    who_has = forward(AsyncClient.who_has)
    workers = forward(AsyncClient.workers)
    status = forward(AsyncClient.status)
    forget = forward(AsyncClient.forget)
    replicate = forward(AsyncClient.replicate)
    goals = forward(AsyncClient.goals)
    lost_keys = forward(AsyncClient.lost_keys)
    retire_workers = forward(AsyncClient.retire_workers)
    put = forward(AsyncClient.put)
    put_many = forward(AsyncClient.put_many)
    get = forward(AsyncClient.get)
    prefetch = forward(AsyncClient.prefetch)
    pin = forward(AsyncClient.pin)
    unpin = forward(AsyncClient.unpin)
