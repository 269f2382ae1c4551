"""The value streams (Put, Get, Fetch) with their chunks handled as bytes, not protobuf messages.

``PutRequest``, ``GetResponse`` and ``FetchResponse`` share one layout, ``oneof item { header = 1;
chunk = 2; }``, and a message holding a chunk is, on the wire, the byte 0x12 (field 2, length-
delimited), the chunk's length as a varint, then the chunk. Through protobuf, every chunk was
copied three times on the way out (slicing the value, building the message, serializing it) and
three on the way in (parsing, and each read of ``message.chunk``), each into fresh memory, and
the receiver kept every message until it joined them. Here a chunk is framed with one copy
straight from the stored value (``framed_chunks``), and read as a ``memoryview`` into the bytes
gRPC hands over (``decoder``). The wire contract does not change: the bytes are those protobuf
writes, and any message that is not exactly one chunk (a header, fields added to the contract
later, another encoder's choices) goes through protobuf as before.

``ValueStreams`` calls Put, Get and Fetch so; the agent's servicer registers the same
(de)serializers. ``Assembly`` collects a value's chunks, hashing large ones in a worker thread
(hashlib releases the GIL) while the next chunk is being received.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import grpc

from amm.base.checksum import StreamingChecksum
from amm.v1 import agent_pb2

if TYPE_CHECKING:
    from google.protobuf.message import Message

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["WorkerAgent"].full_name
#: Field 2 of the value messages, wire type 2 (length-delimited): ``chunk``.
CHUNK_TAG = 0x12
#: Chunks at least this large are hashed in a worker thread; below it, handing a chunk to a
#: thread costs about as much as hashing it on the spot.
THREAD_HASH_BYTES = 256 * 1024


class _ItemMessage(Protocol):
    """A value message: ``oneof item { header = 1; chunk = 2; }``."""

    @property
    def chunk(self) -> bytes: ...

    def WhichOneof(self, oneof_group: Literal["item"]) -> Literal["header", "chunk"] | None: ...


M = TypeVar("M", bound="_ItemMessage")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: The initial metadata an agent sends once it accepted a Put's header: its client sends the
#: chunks only then, so that a refusal (over the memory limit, say) never meets a write in flight,
#: which grpc.aio would report as INTERNAL instead of the status sent (grpc/grpc#36066).
PUT_ACCEPTED_METADATA = ("amm-put", "accepted")


def frame_chunk(data: bytes | memoryview) -> bytes:
    """The serialized value message whose chunk is ``data``: one copy of ``data``."""
    return b"".join((bytes((CHUNK_TAG,)), _varint(len(data)), data))


def framed_chunks(data: bytes, chunk_size: int) -> Iterator[bytes]:
    """A value as serialized chunk messages; an empty value yields none."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield frame_chunk(view[start : start + chunk_size])


def serialize(message: Message | bytes) -> bytes:
    """A message's bytes; bytes (a framed chunk) are already serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def chunk_of(raw: bytes) -> memoryview | None:
    """The chunk of a serialized message that is exactly one chunk field, without a copy; None
    for any other message."""
    if not raw or raw[0] != CHUNK_TAG:
        return None
    length = shift = 0
    for offset in range(1, min(len(raw), 11)):
        byte = raw[offset]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            start = offset + 1
            return memoryview(raw)[start:] if start + length == len(raw) else None
        shift += 7
    return None


def decoder(cls: type[M]) -> Callable[[bytes], M | memoryview]:
    """A response (or request) deserializer: a chunk as a ``memoryview``, any other message
    parsed by protobuf. A chunk that protobuf had to parse comes out as a ``memoryview`` too, so
    readers tell chunks apart by type alone."""
    parse: Callable[[bytes], M] = cls.FromString  # type: ignore[attr-defined]

    def decode(raw: bytes) -> M | memoryview:
        chunk = chunk_of(raw)
        if chunk is not None:
            return chunk
        message = parse(raw)
        if message.WhichOneof("item") == "chunk":
            return memoryview(message.chunk)
        return message

    return decode


class ValueStreams:
    """Put, Get and Fetch of one agent, on a channel the caller owns.

    Put takes a header message, then framed chunks (``framed_chunks``); Get and Fetch yield the
    header message, then chunks as ``memoryview``.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.put: grpc.aio.StreamUnaryMultiCallable[
            agent_pb2.PutRequest | bytes, agent_pb2.PutResponse
        ] = channel.stream_unary(
            f"/{SERVICE}/Put",
            request_serializer=serialize,
            response_deserializer=agent_pb2.PutResponse.FromString,
        )
        self.get: grpc.aio.UnaryStreamMultiCallable[
            agent_pb2.GetRequest, agent_pb2.GetResponse | memoryview
        ] = channel.unary_stream(
            f"/{SERVICE}/Get",
            request_serializer=agent_pb2.GetRequest.SerializeToString,
            response_deserializer=decoder(agent_pb2.GetResponse),
        )
        self.fetch: grpc.aio.UnaryStreamMultiCallable[
            agent_pb2.FetchRequest, agent_pb2.FetchResponse | memoryview
        ] = channel.unary_stream(
            f"/{SERVICE}/Fetch",
            request_serializer=agent_pb2.FetchRequest.SerializeToString,
            response_deserializer=decoder(agent_pb2.FetchResponse),
        )


class Overflow(Exception):
    """More bytes arrived than the value's announced size."""


class Assembly:
    """The chunks of one value of an announced size, counted, hashed and copied into place as
    they arrive.

    Each chunk is copied into the value's buffer at once, so the message it came in is freed
    before the next one arrives and the allocator hands its memory to the next message: kept
    until the end and joined, a value's messages all took fresh memory, whose first touch (a page
    fault per 4 KiB) costs more than copying. ``io.BytesIO`` is the buffer because its
    ``getvalue`` hands over the ``bytes`` it wrote into without another copy (CPython).

    A chunk of ``THREAD_HASH_BYTES`` or more that is not the last is hashed in a worker thread
    while the caller receives the next one (the last would only be waited for); hashing stays in
    order, since each update starts only once the one before it finished. ``add`` raises
    ``Overflow`` before taking a byte beyond ``size``.
    """

    __slots__ = ("_buffer", "_digest", "_pending", "received", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0
        self._digest = StreamingChecksum()
        self._buffer = io.BytesIO()
        self._pending: asyncio.Future[None] | None = None

    async def add(self, chunk: memoryview | bytes) -> None:
        if self.received + len(chunk) > self.size:
            raise Overflow(f"more than the {self.size} bytes announced")
        self.received += len(chunk)
        self._buffer.write(chunk)
        if self._pending is not None:
            await self._pending
            self._pending = None
        if len(chunk) >= THREAD_HASH_BYTES and self.received < self.size:
            loop = asyncio.get_running_loop()
            self._pending = loop.run_in_executor(None, self._digest.update, chunk)
        else:
            self._digest.update(chunk)

    async def finish(self) -> tuple[bytes, str]:
        """The value and its checksum, once every chunk is hashed."""
        if self._pending is not None:
            await self._pending
            self._pending = None
        data = self._buffer.getvalue()
        self._buffer = io.BytesIO()
        return data, self._digest.hexdigest()

    def abandon(self) -> None:
        """Let go of the chunks; a hash running in its thread finishes unobserved."""
        self._buffer = io.BytesIO()
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
