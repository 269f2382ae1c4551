"""What an agent keeps after its data is gone is bounded by time, not only by count: the
changelog the AMM has read, directive outcomes, expired tombstones, and heap memory freed by
removed values. ``benchmarks/soak.py`` measures the whole; these pin each part down."""

from __future__ import annotations

import sys

import pytest

from amm.base.checksum import checksum
from worker_agent import node as node_module
from worker_agent.config import AgentConfig
from worker_agent.directives import HISTORY_TTL
from worker_agent.integrity import Directive, Op
from worker_agent.memory import PsutilProbe
from worker_agent.node import TRIM_AFTER_BYTES, TRIM_EVERY, Forgotten, Node
from worker_agent.store import Key

K = Key("k")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_node(clock: Clock) -> Node:
    return Node(AgentConfig(amm=None), probe=PsutilProbe(), clock=clock)


async def test_directive_outcomes_are_forgotten_after_their_ttl() -> None:
    """Before: up to 100,000 outcomes (about 45 MB) were kept, however old."""
    clock = Clock()
    node = make_node(clock)
    node.store.add(K, b"x", checksum(b"x"))
    directive = Directive("d1", 1, Op.REPLICATE, K, 1, checksum(b"x"), ("127.0.0.1:1",))
    first = await node.run_directive(directive)
    second = await node.run_directive(directive)
    assert (first.duplicate, second.duplicate) == (False, True)
    clock.now = HISTORY_TTL - 1
    node.housekeeping()
    assert (await node.run_directive(directive)).duplicate, "still within its TTL"
    clock.now = 2 * HISTORY_TTL
    node.housekeeping()
    assert not (await node.run_directive(directive)).duplicate


async def test_housekeeping_expires_tombstones_without_a_new_forget() -> None:
    clock = Clock()
    node = make_node(clock)
    node.bury([Forgotten(K, 1, False)])
    assert node.store.tombstones == 1
    clock.now = node.config.tombstone_ttl + 1
    node.housekeeping()
    assert node.store.tombstones == 0


async def test_a_burst_of_tombstones_leaves_no_big_table_once_they_expired() -> None:
    """A dict keeps its table after deletions: 10,000 tombstones left about 300 KiB behind in
    each agent after a soak, until more came."""
    clock = Clock()
    node = make_node(clock)
    empty = sys.getsizeof(node.store._tombstones)
    node.bury([Forgotten(Key(f"k{i}"), i, False) for i in range(10_000)])
    clock.now = node.config.tombstone_ttl + 1
    node.housekeeping()
    assert node.store.tombstones == 0
    assert sys.getsizeof(node.store._tombstones) == empty


async def test_the_heap_is_trimmed_once_enough_bytes_were_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[None] = []

    def trim() -> bool:
        trims.append(None)
        return True

    monkeypatch.setattr(node_module, "trim", trim)
    clock = Clock()
    node = make_node(clock)
    value = b"v" * (TRIM_AFTER_BYTES // 2 + 1)
    for i in range(2):
        node.store.add(Key(f"v{i}"), value, checksum(value))
    node.store.remove(Key("v0"))
    node.housekeeping()
    assert trims == [], "not enough freed yet"
    node.store.remove(Key("v1"))
    node.housekeeping()
    node.housekeeping()
    assert len(trims) == 1, "once per batch of frees"
    clock.now = TRIM_EVERY
    node.housekeeping()
    assert len(trims) == 2, "and once a minute whatever was freed"


async def test_the_amms_polls_let_go_of_the_changes_it_has_read() -> None:
    """Before: the changelog kept up to a million changes, with the keys they name."""
    node = make_node(Clock())
    for i in range(100):
        node.store.add(Key(f"k{i}"), b"x", checksum(b"x"))
        node.store.remove(Key(f"k{i}"))
    assert node.store.changelog_length == 200
    first = node.poll(since=0, incarnation="", full=True, epoch=1)
    assert node.store.changelog_length == 200, "a snapshot acknowledges nothing"
    second = node.poll(since=first.version, incarnation=node.incarnation, full=False, epoch=1)
    node.store.add(K, b"x", checksum(b"x"))
    assert node.store.changelog_length == 201, "kept: a concurrent poll may still ask since 0"
    third = node.poll(since=second.version, incarnation=node.incarnation, full=False, epoch=1)
    assert [info.key for info in third.keys] == [K]
    assert node.store.changelog_length == 1, "what the poll before acknowledged is let go"
    stranger = node.poll(since=third.version, incarnation="another", full=False, epoch=1)
    assert stranger.full
    assert node.store.changelog_length == 1
