"""Peer-to-peer traffic between agents: chunked value transfers and keep-promise requests.

``Peers`` owns one channel per peer address, created on first use inside the running loop and
closed by ``close``. Callers name the addresses (Get sources, directives), so only ``HOST:PORT``
is dialled and the channels are a bounded LRU cache: the least recently used idle channels are
closed beyond ``max_channels``, never one a call is using. With TLS a peer is dialled with this
agent's identity and must prove to be an agent of the cluster CA, whatever its address. Fetching
tries the sources in order, gives up on one that sends no header within ``source_timeout``, and
verifies size and SHA-256 before handing bytes back; failures are values (``FetchFailure``) naming
the reason, because for a directive they are expected outcomes, not errors. Chunks are read as
``memoryview`` and hashed while the next arrives (``amm.base.streams``). Without TLS a Fetch asks
for the source's bulk port (``worker_agent.bulk``), and a source that offers it sends the bytes
there, verified alike; a source whose bulk port cannot be reached is asked again for chunks, and
not offered the bulk port again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration

from amm.base.security import Role, Security
from amm.base.serving import open_channel
from amm.base.streams import Assembly, Overflow, ValueStreams
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from worker_agent import bulk
from worker_agent.integrity import Reason, is_peer_address
from worker_agent.pacing import Pace, parts
from worker_agent.runs import runs
from worker_agent.store import Key
from worker_agent.traffic import Traffic

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Peer channels kept open at most (beyond it, the least recently used idle ones are closed).
MAX_PEER_CHANNELS = 256
#: PromiseKeep calls in flight to one peer that serves no PromiseKeepBatch.
PROMISES_AT_ONCE = 32
#: ``PromiseKeepBatchResponse.answers``: read as runs of alike bytes (``runs``).
_ANSWERS_FIELD = agent_pb2.PromiseKeepBatchResponse.ANSWERS_FIELD_NUMBER


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified value and where it came from."""

    data: bytes
    checksum: str
    source: str


@dataclass(frozen=True, slots=True)
class FetchFailure:
    """No source provided a verified value: SOURCE_UNAVAILABLE or CHECKSUM_MISMATCH.

    ``missing`` when every source answered that it does not hold the key (with that content).
    """

    reason: Reason
    message: str
    missing: bool = False


@dataclass(frozen=True, slots=True)
class PromiseAnswer:
    """A holder's answer to PromiseKeep; ``reason`` is None when it kept the key.

    ``lease`` is the lease granted in seconds, None when the holder did not say (an agent older
    than ``PromiseKeepResponse.lease``): such a promise cannot be relied on.
    """

    address: str
    kept: bool
    reason: Reason | None
    message: str
    lease: float | None = None


class _Corrupt(Exception):
    """The data a source sent does not match what it or the caller declared."""


class _Silent(Exception):
    """A source sent no header within ``source_timeout``, or its bulk transfer broke off."""


class _NoBulk(Exception):
    """A source's bulk port could not be reached: ask it for chunks instead."""


def reason_from_proto(value: int) -> Reason | None:
    """The domain reason for a wire ``RefusalReason``; None for UNSPECIFIED or unknown values."""
    try:
        name = types_pb2.RefusalReason.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return None
    return Reason.__members__.get(name.removeprefix("REFUSAL_REASON_"))


class _NotAnAddress(Exception):
    """A peer address that is not ``HOST:PORT``; never dialled."""


class Peers:
    """Channels to other agents and the calls this agent makes on them."""

    def __init__(
        self,
        *,
        bulk: bool = False,
        fetch_timeout: float,
        max_value_bytes: int,
        max_channels: int = MAX_PEER_CHANNELS,
        source_timeout: float | None = None,
        traffic: Traffic | None = None,
        security: Security | None = None,
    ) -> None:
        self._traffic = traffic if traffic is not None else Traffic()
        self._bulk = bulk
        #: Sources whose bulk port could not be reached: asked for chunks from then on.
        self._no_bulk: set[str] = set()
        self._security = security
        self._fetch_timeout = fetch_timeout
        self._source_timeout = min(source_timeout or fetch_timeout, fetch_timeout)
        self._max_value_bytes = max_value_bytes
        self._max_channels = max_channels
        # Least recently used first.
        self._channels: collections.OrderedDict[str, grpc.aio.Channel] = collections.OrderedDict()
        self._busy: collections.Counter[str] = collections.Counter()
        #: The stub made on each open channel: making one builds a callable per method of the
        #: service (a few percent of an agent's CPU while it drops, made per promise call).
        self._stubs: dict[str, tuple[grpc.aio.Channel, agent_pb2_grpc.WorkerAgentAsyncStub]] = {}
        self._closed = False

    def __len__(self) -> int:
        """How many channels are open."""
        return len(self._channels)

    @contextlib.asynccontextmanager
    async def _channel(self, address: str) -> AsyncIterator[grpc.aio.Channel]:
        """The channel to ``address``, marked busy while the caller uses it.

        Idle channels beyond the bound are closed here, before the call, least recently used
        first: closing one that a call is using would break that call. When every channel is
        busy the cache grows past the bound for a while, and shrinks at a later call.
        """
        if self._closed:
            raise RuntimeError("peer channels are closed")
        if not is_peer_address(address):
            raise _NotAnAddress(f"not a HOST:PORT address: {address[:100]!r}")
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, self._security, expect=Role.AGENT)
            self._channels[address] = channel
        else:
            self._channels.move_to_end(address)
        self._busy[address] += 1
        try:
            await self._evict()
            yield channel
        finally:
            self._busy[address] -= 1
            if self._busy[address] <= 0:
                del self._busy[address]

    @contextlib.asynccontextmanager
    async def _stub(self, address: str) -> AsyncIterator[agent_pb2_grpc.WorkerAgentAsyncStub]:
        """A stub on the channel to ``address`` (see ``_channel``)."""
        async with self._channel(address) as channel:
            made = self._stubs.get(address)
            if made is None or made[0] is not channel:
                made = self._stubs[address] = (channel, agent_pb2_grpc.WorkerAgentStub(channel))
            yield made[1]

    async def _evict(self) -> None:
        excess = len(self._channels) - self._max_channels
        if excess <= 0:
            return
        idle = [address for address in self._channels if not self._busy[address]][:excess]
        evicted = [self._channels.pop(address) for address in idle]
        for address in idle:
            self._stubs.pop(address, None)
        await asyncio.gather(*(channel.close(None) for channel in evicted))

    async def close(self) -> None:
        """Close every channel; idempotent."""
        self._closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(channel.close(None) for channel in channels))

    async def fetch(
        self,
        key: Key,
        sources: list[str],
        *,
        expected_size: int | None,
        expected_checksum: str,
        requester: str,
    ) -> Fetched | FetchFailure:
        """The value of ``key`` from the first source that sends it intact.

        1. A source that cannot be reached, lacks the key or holds other content (it answers
           NOT_FOUND when ``expected_checksum`` differs from its own) is skipped.
        2. A source whose data does not match the declared size or checksum is skipped too; if
           that is why every source failed, the failure is CHECKSUM_MISMATCH.
        """
        answers: list[str] = []
        corrupt = False
        missing = True
        started = time.perf_counter()
        for source in sources:
            try:
                data, digest = await self._fetch_one(
                    source, key, expected_size, expected_checksum, requester
                )
            except grpc.aio.AioRpcError as err:
                missing = missing and err.code() is grpc.StatusCode.NOT_FOUND
                answers.append(f"{source}: {err.code().name} {err.details() or ''}".strip())
                continue
            except (_NotAnAddress, _Silent) as err:
                missing = False
                answers.append(f"{source}: {err}" if isinstance(err, _Silent) else str(err))
                continue
            except _Corrupt as err:
                corrupt = True
                missing = False
                answers.append(f"{source}: {err}")
                log.warning("corrupt transfer of %r from %s: %s", key, source, err)
                continue
            self._traffic.received["peer"] += len(data)
            self._traffic.transfers["in"].observe(time.perf_counter() - started)
            return Fetched(data, digest, source)
        if not sources:
            return FetchFailure(Reason.SOURCE_UNAVAILABLE, f"no source for {key!r}", missing=True)
        reason = Reason.CHECKSUM_MISMATCH if corrupt else Reason.SOURCE_UNAVAILABLE
        message = f"could not fetch {key!r}: " + "; ".join(answers)
        return FetchFailure(reason, message, missing=missing)

    async def _fetch_one(
        self,
        source: str,
        key: Key,
        expected_size: int | None,
        expected_checksum: str,
        requester: str,
    ) -> tuple[bytes, str]:
        use_bulk = self._bulk and source not in self._no_bulk
        async with self._channel(source) as channel:
            streams = ValueStreams(channel)
            request = agent_pb2.FetchRequest(
                key=key, checksum=expected_checksum, requester=requester, bulk=use_bulk
            )
            while True:
                try:
                    return await self._receive(
                        streams.fetch(request, timeout=self._fetch_timeout),
                        request.bulk,
                        source,
                        key,
                        expected_size,
                        expected_checksum,
                    )
                except _NoBulk as err:  # only raised when asked: the retry asks for chunks
                    log.info("%s; fetching %r from it in chunks from now on", err, key)
                    self._no_bulk.add(source)
                    request.bulk = False

    async def _receive(
        self,
        call: grpc.aio.UnaryStreamCall[
            agent_pb2.FetchRequest, agent_pb2.FetchResponse | memoryview
        ],
        asked_bulk: bool,
        source: str,
        key: Key,
        expected_size: int | None,
        expected_checksum: str,
    ) -> tuple[bytes, str]:
        received: Assembly | None = None
        try:
            header: types_pb2.ValueHeader | None = None
            messages = aiter(call)
            try:
                async with asyncio.timeout(self._source_timeout):
                    first = await anext(messages, None)
            except TimeoutError:
                raise _Silent(f"sent nothing within {self._source_timeout:g} s") from None
            if first is None:
                raise _Corrupt("the stream ended before the header")
            async for message in _chain(first, messages):
                if received is None:
                    if isinstance(message, memoryview) or message.WhichOneof("item") != "header":
                        raise _Corrupt("the first message is not a header")
                    header = message.header
                    _check_header(header, key, expected_size, expected_checksum)
                    if header.size > self._max_value_bytes:
                        raise _Corrupt(f"{header.size} bytes exceed the largest value accepted")
                    if message.HasField("bulk"):
                        if not asked_bulk:
                            raise _Corrupt("offered the bulk port, which was not asked for")
                        return await self._receive_bulk(source, message.bulk, header)
                    received = Assembly(header.size)
                    continue
                if not isinstance(message, memoryview):
                    raise _Corrupt("a message after the header holds no chunk")
                try:
                    await received.add(message)
                except Overflow as err:
                    raise _Corrupt(str(err)) from None
            if received is None or header is None:
                raise _Corrupt("the stream ended before the header")
            if received.received != header.size:
                raise _Corrupt(f"{received.received} bytes received, {header.size} announced")
            data, digest = await received.finish()
            if digest != header.checksum:
                raise _Corrupt("the data does not match its checksum")
            return data, header.checksum
        finally:
            if received is not None:
                received.abandon()
            call.cancel()

    async def _receive_bulk(
        self, source: str, offer: agent_pb2.BulkOffer, header: types_pb2.ValueHeader
    ) -> tuple[bytes, str]:
        """The value offered on ``source``'s bulk port, verified against ``header``; only
        when this Fetch asked for it (else a port that proves unreachable would be retried)."""
        if not 0 < offer.port < 65536 or len(offer.ticket) != bulk.TICKET_BYTES:
            raise _Corrupt("sent a malformed bulk offer")
        try:
            async with asyncio.timeout(self._fetch_timeout):
                data, digest = await bulk.receive(
                    bulk.host_of(source),
                    offer.port,
                    offer.ticket,
                    header.size,
                    self._source_timeout,
                )
        except bulk.Unreachable as err:
            raise _NoBulk(f"{source}: bulk port {offer.port} unreachable: {err}") from None
        except (bulk.BulkError, TimeoutError) as err:
            raise _Silent(f"the bulk transfer broke off: {err or 'timed out'}") from None
        if digest != header.checksum:
            raise _Corrupt("the data does not match its checksum")
        return data, header.checksum

    async def promise_keep(
        self,
        address: str,
        *,
        key: Key,
        checksum: str,
        lease: float,
        requester: str,
        directive_id: str,
        deadline: float,
    ) -> PromiseAnswer:
        """Ask ``address`` to keep ``key``; an unreachable holder is a refusal, not an error."""
        request = agent_pb2.PromiseKeepRequest(
            key=key,
            checksum=checksum,
            lease=_duration(lease),
            requester=requester,
            directive_id=directive_id,
        )
        try:
            async with self._stub(address) as stub:
                response = await stub.PromiseKeep(request, timeout=deadline)
        except grpc.aio.AioRpcError as err:
            return PromiseAnswer(address, False, None, f"{err.code().name} {err.details() or ''}")
        except _NotAnAddress as err:
            return PromiseAnswer(address, False, None, str(err))
        return _promise_answer(address, response)

    async def promise_keep_batch(
        self,
        address: str,
        items: Sequence[tuple[Key, str]],
        *,
        lease: float,
        requester: str,
        deadline: float,
    ) -> list[PromiseAnswer]:
        """Ask ``address`` to keep each ``(key, checksum)``: one answer per item, in order.

        One PromiseKeepBatch call; a peer that does not serve it (UNIMPLEMENTED: an agent
        without "keep-batches") is asked key by key instead. Never raises: an unreachable
        holder refuses every item.
        """
        request = agent_pb2.PromiseKeepBatchRequest(lease=_duration(lease), requester=requester)
        add, pace = request.items.add, Pace()  # thousands of items: the loop is let in
        for part in parts(items):
            await pace.breathe()
            for key, checksum in part:
                add(key=key, checksum=checksum)
        try:
            async with self._stub(address) as stub:
                response = await stub.PromiseKeepBatch(request, timeout=deadline)
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                return await self._promise_each(address, items, lease, requester, deadline)
            refusal = PromiseAnswer(address, False, None, f"{err.code().name} {err.details()}")
            return [refusal] * len(items)
        except _NotAnAddress as err:
            return [PromiseAnswer(address, False, None, str(err))] * len(items)
        if len(response.answers) != len(items):
            odd = f"answered {len(response.answers)} of {len(items)} items"
            return [PromiseAnswer(address, False, None, odd)] * len(items)
        # Nearly every answer of a batch is the same promise (the lease asked), in long runs of
        # alike bytes: each run is read once (reading each answer cost microseconds each).
        found = runs(response.SerializeToString(), _ANSWERS_FIELD)
        if found is not None:
            answers = []
            for encoded, count in found:
                answer = agent_pb2.PromiseKeepResponse.FromString(encoded)
                answers += [_promise_answer(address, answer)] * count
            if len(answers) == len(items):
                return answers
        answers = []
        promised: dict[tuple[int, int, str], PromiseAnswer] = {}
        for answer in response.answers:
            if pace.due():
                await pace.breathe()
            if answer.kept and answer.HasField("lease"):
                granted = answer.lease
                alike = (granted.seconds, granted.nanos, answer.message)
                known = promised.get(alike)
                if known is None:
                    known = promised[alike] = _promise_answer(address, answer)
                answers.append(known)
            else:
                answers.append(_promise_answer(address, answer))
        return answers

    async def _promise_each(
        self,
        address: str,
        items: Sequence[tuple[Key, str]],
        lease: float,
        requester: str,
        deadline: float,
    ) -> list[PromiseAnswer]:
        slots = asyncio.Semaphore(PROMISES_AT_ONCE)

        async def ask(key: Key, checksum: str) -> PromiseAnswer:
            async with slots:
                return await self.promise_keep(
                    address,
                    key=key,
                    checksum=checksum,
                    lease=lease,
                    requester=requester,
                    directive_id="",
                    deadline=deadline,
                )

        return list(await asyncio.gather(*(ask(key, checksum) for key, checksum in items)))


async def _chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _promise_answer(address: str, response: agent_pb2.PromiseKeepResponse) -> PromiseAnswer:
    if response.kept:
        granted = response.lease.ToNanoseconds() if response.HasField("lease") else 0
        granted_s = granted / 1e9 if granted > 0 else None
        return PromiseAnswer(address, True, None, response.message, granted_s)
    return PromiseAnswer(address, False, reason_from_proto(response.reason), response.message)


def _check_header(
    header: types_pb2.ValueHeader, key: Key, expected_size: int | None, expected_checksum: str
) -> None:
    if header.key != key:
        raise _Corrupt(f"sent key {header.key!r} instead")
    if expected_checksum and header.checksum != expected_checksum:
        raise _Corrupt(
            f"announces checksum {header.checksum[:12]}, expected {expected_checksum[:12]}"
        )
    if expected_size is not None and header.size != expected_size:
        raise _Corrupt(f"announces {header.size} bytes, expected {expected_size}")
