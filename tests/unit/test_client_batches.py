"""Packing values into PutMany messages and calls (``amm.batches``): limits, order, big values."""

from __future__ import annotations

import pytest

from amm.base.checksum import checksum
from amm.batches import Item, batches, item_bytes, items_of, split


def items(count: int, size: int) -> list[Item]:
    return items_of((f"k{i:03}", bytes([i % 256]) * size) for i in range(count))


def test_items_are_checksummed_once_from_a_mapping_or_pairs() -> None:
    (a,) = items_of({"a": bytearray(b"xy")})
    assert a == Item("a", b"xy", checksum(b"xy"))
    assert items_of([("a", memoryview(b"xy"))]) == [a]
    with pytest.raises(TypeError, match="not bytes"):
        items_of({"a": "xy"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys are strings"):
        items_of([(1, b"x")])  # type: ignore[list-item]


def test_messages_and_calls_stay_within_their_limits_and_keep_the_order() -> None:
    values = items(100, 1000)
    per_item = item_bytes(values[0])
    cut = list(batches(values, message_bytes=10 * per_item, call_bytes=35 * per_item))
    assert [len(b.items) for b in cut] == [35, 35, 30]
    assert [[len(m.items) for m in b.messages] for b in cut] == [
        [10, 10, 10, 5],
        [10, 10, 10, 5],
        [10, 10, 10],
    ]
    sent = [i.key for b in cut for m in b.messages for i in m.items]
    assert sent == [v.key for v in values]
    assert [i.key for b in cut for i in b.items] == sent
    first = cut[0].messages[0].items[0]
    assert (first.data, first.checksum) == (values[0].data, values[0].checksum)
    assert list(batches([])) == []


def test_values_too_large_for_a_message_are_set_aside() -> None:
    values = [*items(2, 10), Item("big", b"x" * 1000, checksum(b"x" * 1000))]
    small, large = split(values, message_bytes=500)
    assert [v.key for v in small] == ["k000", "k001"]
    assert [v.key for v in large] == ["big"]
