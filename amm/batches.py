"""Packing many small values into ``PutMany`` messages, for ``put_many``.

What it covers: the client's side of the batch put: checksumming each value once, cutting the
values into messages of at most ``MESSAGE_BYTES`` and the messages into calls of at most
``CALL_BYTES``, and setting aside the values too large for a message (they go through ``Put``,
in chunks). A batch is built once and may be sent to several workers: the messages are shared.

What it does not: any I/O, or deciding where values go (``client``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from amm.base.checksum import checksum
from amm.v1 import agent_pb2

#: Most bytes of one PutMany message, well under the 16 MiB message cap: an agent stores a
#: message in one go, so a smaller one holds its event loop for less time.
MESSAGE_BYTES = 4 * 1024 * 1024
#: Most bytes of one PutMany call: the client's timeout applies to each call, so a large upload
#: is cut into calls that each carry a bounded amount of data.
CALL_BYTES = 64 * 1024 * 1024
#: What an item costs in a message besides its key and value: the 64-digit checksum, field tags
#: and lengths, rounded up.
ITEM_OVERHEAD = 96

Data = bytes | bytearray | memoryview
"""A value as ``put_many`` takes it."""


class Item(NamedTuple):
    """One value to store, with its checksum (a tuple: there may be millions, built fast)."""

    key: str
    data: bytes
    checksum: str


@dataclass(frozen=True, slots=True)
class Batch:
    """The items of one PutMany call, and its messages."""

    items: tuple[Item, ...]
    messages: tuple[agent_pb2.PutManyRequest, ...]


def items_of(values: Mapping[str, Data] | Iterable[tuple[str, Data]]) -> list[Item]:
    """Each ``(key, value)`` with its checksum; ``TypeError`` for a key that is not a string or
    a value that is not bytes-like (kept whole: a bytearray is copied, as a Put would send it)."""
    pairs = values.items() if isinstance(values, Mapping) else values
    items = []
    for key, value in pairs:
        if not isinstance(key, str):
            raise TypeError(f"keys are strings, not {type(key).__name__}: {key!r}")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"the value of {key!r} is {type(value).__name__}, not bytes")
        data = value if isinstance(value, bytes) else bytes(value)
        items.append(Item(key, data, checksum(data)))
    return items


def item_bytes(item: Item) -> int:
    """About what ``item`` takes in a message."""
    return len(item.key.encode()) + len(item.data) + ITEM_OVERHEAD


def split(
    items: Sequence[Item], message_bytes: int = MESSAGE_BYTES
) -> tuple[list[Item], list[Item]]:
    """The items that fit in a message, and those too large for one (for ``Put``)."""
    small: list[Item] = []
    large: list[Item] = []
    for item in items:
        (small if item_bytes(item) <= message_bytes else large).append(item)
    return small, large


def batches(
    items: Iterable[Item],
    *,
    message_bytes: int = MESSAGE_BYTES,
    call_bytes: int = CALL_BYTES,
) -> Iterator[Batch]:
    """The items, in order, as calls of messages within the limits; each item must fit in a
    message (``split``). Built lazily, so that at most one call's messages exist at a time."""
    call: list[Item] = []
    messages: list[agent_pb2.PutManyRequest] = []
    message: list[Item] = []
    in_message = in_call = 0
    for item in items:
        size = item_bytes(item)
        if message and in_message + size > message_bytes:
            messages.append(_message(message))
            message, in_message = [], 0
        if call and in_call + size > call_bytes:
            if message:
                messages.append(_message(message))
                message, in_message = [], 0
            yield Batch(tuple(call), tuple(messages))
            call, messages, in_call = [], [], 0
        message.append(item)
        call.append(item)
        in_message += size
        in_call += size
    if message:
        messages.append(_message(message))
    if call:
        yield Batch(tuple(call), tuple(messages))


def _message(items: list[Item]) -> agent_pb2.PutManyRequest:
    message = agent_pb2.PutManyRequest()
    add = message.items.add  # faster than building each PutItem and copying it in
    for key, data, digest in items:
        add(key=key, data=data, checksum=digest)
    return message
