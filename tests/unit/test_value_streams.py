"""Chunks of the value streams as bytes (``amm.base.streams``): the same wire bytes as
protobuf's, read back without a copy, and ``Assembly``'s counting and hashing."""

from __future__ import annotations

import os
from typing import Any

import pytest
from google.protobuf.message import DecodeError

from amm.base.checksum import checksum
from amm.base.streams import (
    THREAD_HASH_BYTES,
    Assembly,
    Overflow,
    chunk_of,
    decoder,
    frame_chunk,
    framed_chunks,
    serialize,
)
from amm.v1 import agent_pb2, types_pb2

VALUE_MESSAGES = (agent_pb2.PutRequest, agent_pb2.GetResponse, agent_pb2.FetchResponse)
#: Around each boundary of the length's varint (1, 2, 3 bytes long), and a chunk of 1 MiB.
SIZES = [0, 1, 127, 128, 16_383, 16_384, 2**21 - 1, 2**21, 1024 * 1024]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cls", VALUE_MESSAGES)
def test_a_framed_chunk_is_what_protobuf_writes_and_reads(size: int, cls: Any) -> None:
    data = os.urandom(size)
    framed = frame_chunk(memoryview(data))
    assert framed == cls(chunk=data).SerializeToString()
    assert cls.FromString(framed).chunk == data
    decoded = decoder(cls)(framed)
    assert isinstance(decoded, memoryview)
    assert decoded.tobytes() == data


def test_a_value_is_framed_in_chunks_of_the_given_size() -> None:
    data = os.urandom(2500)
    messages = list(framed_chunks(data, 1000))
    chunks = [agent_pb2.FetchResponse.FromString(m).chunk for m in messages]
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert b"".join(chunks) == data
    assert list(framed_chunks(b"", 1000)) == []


def test_a_chunk_read_back_shares_the_received_bytes() -> None:
    framed = frame_chunk(b"abc")
    chunk = chunk_of(framed)
    assert chunk is not None
    assert chunk.obj is framed, "a view into the message, not a copy"
    assert chunk.tobytes() == b"abc"


def test_headers_and_other_messages_go_through_protobuf() -> None:
    header = types_pb2.ValueHeader(key="k", size=3, checksum=checksum(b"abc"))
    decode = decoder(agent_pb2.GetResponse)
    decoded = decode(serialize(agent_pb2.GetResponse(header=header)))
    assert isinstance(decoded, agent_pb2.GetResponse)
    assert decoded.header == header
    empty = decode(b"")
    assert isinstance(empty, agent_pb2.GetResponse)
    assert empty.WhichOneof("item") is None
    assert serialize(b"already bytes") == b"already bytes"


def test_a_header_with_a_bulk_offer_goes_through_protobuf_whole() -> None:
    header = types_pb2.ValueHeader(key="k", size=3, checksum=checksum(b"abc"))
    offer = agent_pb2.BulkOffer(port=4242, ticket=bytes(range(32)))
    raw = serialize(agent_pb2.FetchResponse(header=header, bulk=offer))
    assert chunk_of(raw) is None
    decoded = decoder(agent_pb2.FetchResponse)(raw)
    assert isinstance(decoded, agent_pb2.FetchResponse)
    assert (decoded.header, decoded.bulk) == (header, offer)


@pytest.mark.parametrize(
    "raw",
    [
        # The chunk, then a field this reader does not know (a later version of the contract).
        frame_chunk(b"abc") + b"\x18\x07",
        # A field it does not know, then the chunk.
        b"\x18\x07" + frame_chunk(b"abc"),
        # Two chunk fields: protobuf keeps the last.
        frame_chunk(b"xyz") + frame_chunk(b"abc"),
        # The length's varint padded with a redundant continuation byte.
        b"\x12\x83\x00abc",
    ],
    ids=["unknown-after", "unknown-before", "last-chunk-wins", "padded-length"],
)
def test_a_chunk_in_any_other_encoding_is_still_a_chunk(raw: bytes) -> None:
    fast = chunk_of(raw)
    assert fast is None or fast.tobytes() == b"abc"
    decoded = decoder(agent_pb2.PutRequest)(raw)
    assert isinstance(decoded, memoryview)
    assert decoded.tobytes() == b"abc"


@pytest.mark.parametrize("raw", [b"\x12\x05abc", b"\x12", b"\x12\x80"])
def test_a_truncated_chunk_is_a_decode_error(raw: bytes) -> None:
    assert chunk_of(raw) is None
    with pytest.raises(DecodeError):
        decoder(agent_pb2.FetchResponse)(raw)


@pytest.mark.parametrize("chunk_size", [1000, THREAD_HASH_BYTES, 3 * THREAD_HASH_BYTES + 7])
async def test_an_assembly_joins_and_hashes_its_chunks(chunk_size: int) -> None:
    """Small chunks are hashed on the spot, large ones in a thread: the same result."""
    data = os.urandom(5 * THREAD_HASH_BYTES + 11)
    assembly = Assembly(len(data))
    for start in range(0, len(data), chunk_size):
        await assembly.add(memoryview(data)[start : start + chunk_size])
    assert assembly.received == len(data)
    value, digest = await assembly.finish()
    assert type(value) is bytes
    assert value == data
    assert digest == checksum(data)


async def test_an_assembly_takes_no_byte_beyond_the_announced_size() -> None:
    assembly = Assembly(10)
    await assembly.add(b"12345")
    with pytest.raises(Overflow, match="more than the 10 bytes announced"):
        await assembly.add(b"123456")
    assert assembly.received == 5
    await assembly.add(b"67890")
    assert await assembly.finish() == (b"1234567890", checksum(b"1234567890"))


async def test_an_empty_value_and_an_abandoned_one() -> None:
    assert await Assembly(0).finish() == (b"", checksum(b""))
    abandoned = Assembly(2 * THREAD_HASH_BYTES)
    await abandoned.add(os.urandom(THREAD_HASH_BYTES))
    abandoned.abandon()
    abandoned.abandon()
