"""Directive ids kept as a prefix and a number (``decisions.ids``) and directives waiting to be
sent kept in columns (``decisions.packed``): what goes in comes out, id for id and field for
field, at a fraction of the memory."""

from __future__ import annotations

import gc
import tracemalloc

from amm_service import wire
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.ids import IdSet, split_id
from amm_service.decisions.packed import DirectivePack
from amm_service.decisions.view import Key, WorkerId


def test_an_id_splits_only_where_it_joins_back() -> None:
    assert split_id("e3.a1b2c3d4.1234") == ("e3.a1b2c3d4.", 1234)
    assert split_id("7") == ("", 7)
    assert split_id("handover") is None
    assert split_id("e3.x.007") is None, "str(7) would not give the id back"
    assert split_id("e3.x.0") == ("e3.x.", 0)


def test_an_id_set_holds_what_was_added_and_not_discarded() -> None:
    ids = IdSet()
    added = [f"e1.ab.{n}" for n in range(1, 20_000, 3)] + ["other", "e1.ab.007", "e2.cd.5"]
    added += ["e1.ab.99999999999"]  # far past the others: kept whole
    for i in added:
        ids.add(i)
    ids.add(added[0])  # twice: once
    assert len(ids) == len(added)
    gone = set(added[::2])
    for i in gone:
        assert ids.discard(i)
        assert not ids.discard(i)
    left = [i for i in added if i not in gone]
    assert sorted(ids) == sorted(left)
    assert all(i in ids for i in left)
    assert not any(i in ids for i in gone)
    assert "e1.ab.2" not in ids
    assert 5 not in ids
    for i in left:
        ids.discard(i)
    assert len(ids) == 0
    assert list(ids) == []


def test_answers_taken_in_a_batch_discard_as_one_at_a_time_would() -> None:
    one, batch = IdSet(), IdSet()
    sent = [f"e1.ab.{n}" for n in range(1, 30_000)]
    for ids in (one, batch):
        for i in sent:
            ids.add(i)
    answers = sent[::3] + sent[:10_000] + ["e1.ab.99999", "e1.ab.01", "x", "e1.ab.x"]
    for i in answers:
        one.discard(i)
    batch.discard_all(answers)
    assert sorted(batch) == sorted(one)
    assert len(batch) == len(one)
    batch.discard_all(sent)
    assert len(batch) == 0
    assert list(batch) == []


def test_an_id_set_costs_about_a_byte_per_id_of_a_stream() -> None:
    """300,000 drops sent to 4 agents in a big cycle: each stream's unanswered ids were a dict
    of strings, about 120 bytes each."""
    gc.collect()
    tracemalloc.start()
    try:
        ids = IdSet()
        for n in range(1, 400_001, 4):  # one stream's share of ids numbered across four
            ids.add_number("e1.5eed0001.", n)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(ids) == 100_000
    assert held / 100_000 <= 8, f"{held / 100_000:.1f} bytes per id"


def _directives() -> list[Directive]:
    a, b, c = WorkerId("a"), WorkerId("b"), WorkerId("c")
    return [
        Directive("e1.x.1", 3, Op.DROP, Key("k"), a, 10, "sum", (), (b, c), "P", "why"),
        Directive("e1.x.2", 3, Op.REPLICATE, Key("k"), c, 10, "sum", (a,), (), "Q", ""),
        Directive("e1.x.3", 3, Op.DROP, Key("j"), b, 0, "", (), (), "", ""),
        Directive("whole", 3, Op.DROP, Key("i"), b, 1, "s", (), (a,), "", ""),
        Directive("e2.y.4", 4, Op.DROP, Key("h"), b, 1, "s", (), (a,), "", ""),
        Directive("e1.x.05", 3, Op.DROP, Key("g"), a, 1, "s", (), (b,), "", ""),
    ]


def test_a_pack_gives_back_each_directive_and_the_same_wire_batch() -> None:
    directives = _directives()
    pack = DirectivePack(directives)
    assert len(pack) == len(directives)
    assert list(pack) == directives
    assert [pack[i] for i in range(-1, -len(directives) - 1, -1)] == directives[::-1]
    assert list(pack.ids()) == [d.id for d in directives]
    from amm.v1 import agent_pb2

    request = agent_pb2.DirectivesRequest()
    wire.pack_request(pack, 0, 2, request)
    wire.pack_request(pack, 2, 100, request)
    assert request == wire.directives_request(directives)


def test_a_packed_directive_costs_a_fraction_of_a_directive() -> None:
    keys = [Key(f"key-{k}") for k in range(10_000)]
    keeper = (WorkerId("a"),)
    directives = [
        Directive(f"e1.5eed.{n}", 1, Op.DROP, k, WorkerId("b"), 1000, "c", (), keeper, "R", "x")
        for n, k in enumerate(keys)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        pack = DirectivePack(directives)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(pack) == 10_000
    assert held / 10_000 <= 64, f"{held / 10_000:.0f} bytes per packed directive"


def test_a_pack_of_directives_of_another_epoch_or_unnumbered_first_reads_back() -> None:
    a = WorkerId("a")
    directives = [
        Directive("first", 0, Op.DROP, Key("k"), a, 1, "s", (), (), "", ""),
        Directive("e5.x.3", 5, Op.DROP, Key("j"), a, 1, "s", (), (), "", ""),
        Directive("e5.x.4", 5, Op.REPLICATE, Key("i"), a, 1, "s", (a,), (), "", ""),
    ]
    assert list(DirectivePack(directives)) == directives


def test_an_id_set_takes_a_message_of_numbers_at_once() -> None:
    one, batch = IdSet(), IdSet()
    numbers = [7, 3, 3, 12, 5_000_000, 9]  # one far off: kept apart
    for n in numbers:
        one.add_number("e1.z.", n)
    batch.add_numbers("e1.z.", numbers)
    batch.add_numbers("e1.z.", [])
    assert sorted(batch) == sorted(one)
    assert len(batch) == len(one) == 5
