"""The ledger keeps directives in flight in columns (``decisions.pending``): a bounded number
of bytes each, freed when they leave, and every directive given back exactly as it was entered,
under the same id, whether it is answered, refused, sent again or expired."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import Key, WorkerId

WORKERS = [WorkerId(f"10.0.0.{w}:7000") for w in range(4)]
#: Bytes a directive in flight may hold in the ledger. Entries of ``Directive`` objects, their id
#: strings and a map by id held 326 each; the columns hold about 100.
BOUND = 140


def _drops(keys: list[Key], sums: list[str], prefix: str = "e1.5eed0001.") -> list[Directive]:
    """Three drops per key, as ReduceReplicas plans them from 4 replicas, with fence-like ids."""
    keepers = (WORKERS[0],)
    out = []
    n = 0
    for key, checksum in zip(keys, sums, strict=True):
        for w in WORKERS[1:]:
            n += 1
            out.append(
                Directive(
                    f"{prefix}{n}", 1, Op.DROP, key, w, 1000, checksum, (), keepers, "R", "extra"
                )
            )
    return out


def _traced(work: Callable[[], object]) -> tuple[int, object]:
    """The memory still traced after ``work`` (whose result is kept), in bytes."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        kept = work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base, kept
    finally:
        tracemalloc.stop()


def test_a_directive_in_flight_holds_a_bounded_number_of_bytes() -> None:
    keys = [Key(f"key-{k}") for k in range(20_000)]
    sums = [f"{k:064x}" for k in range(20_000)]

    def enter() -> Ledger:
        ledger = Ledger()
        for directive in _drops(keys, sums):  # built and dropped as a cycle does
            ledger.add(directive, now=0.0, cycle=1)
        return ledger

    held, ledger = _traced(enter)
    assert isinstance(ledger, Ledger)
    assert len(ledger) == 60_000
    assert held / 60_000 <= BOUND, f"{held / 60_000:.0f} bytes per directive in flight"


def test_the_memory_of_directives_that_left_is_freed() -> None:
    keys = [Key(f"key-{k}") for k in range(5_000)]
    sums = [f"{k:064x}" for k in range(5_000)]
    drops = _drops(keys, sums)
    ledger = Ledger()

    def cycle() -> None:
        for d in drops:
            ledger.add(d, now=0.0)
        for n, d in enumerate(drops):
            ledger.settle(Outcome(d.id, OutcomeStatus.APPLIED, inventory_version=n))
        ledger.observe(lambda worker: len(drops))

    held, _ = _traced(cycle)
    assert len(ledger) == 0
    assert ledger.in_flight(keys[0]).dropping == frozenset()
    # What stays: the journal of the keys that changed (bounded, ``decisions.journal``).
    assert held < 200_000, f"{held} bytes left behind by 15,000 directives settled"


def test_directives_come_back_exactly_as_entered_under_the_same_ids() -> None:
    a, b, c = WORKERS[:3]
    entered = [
        Directive("e2.ab.7", 2, Op.DROP, Key("k"), a, 10, "s1", (), (b, c), "P", "why"),
        Directive("e2.ab.8", 2, Op.REPLICATE, Key("k"), c, 10, "s1", (a,), (), "Q", ""),
        Directive("e2.ab.9", 2, Op.DROP, Key("j"), b, 0, "", (), (), "", ""),
        Directive("e2.ab.3", 2, Op.DROP, Key("i"), a, 5, "s3", (), (c,), "P", ""),  # older id
        Directive("e3.cd.1", 3, Op.DROP, Key("h"), a, 5, "s4", (), (c,), "P", ""),  # new epoch
        Directive("handover-x", 2, Op.DROP, Key("g"), b, 5, "s5", (), (a,), "", ""),  # no number
        Directive("e2.ab.007", 2, Op.DROP, Key("f"), b, 5, "s6", (), (a,), "", ""),  # leading 0
    ]
    ledger = Ledger()
    for d in entered:
        ledger.add(d, now=0.0, cycle=4)
    assert [e.directive for e in ledger] == entered
    assert list(ledger.directives()) == entered
    assert all(d.id in ledger for d in entered)
    assert "e2.ab.10" not in ledger
    assert "e2.ab.6" not in ledger
    assert "e2.ab.07" not in ledger
    # Sent again: the same directive, same id, moved to the back; still answerable by id.
    again = ledger.overdue(now=31.0, timeout=30.0)
    assert again == entered
    assert [e.directive.id for e in ledger] == [d.id for d in entered]
    for d in entered:
        entry = ledger.settle(Outcome(d.id, OutcomeStatus.REFUSED, "KEEP_PROMISED"))
        assert entry is not None
        assert entry.directive == d
        assert entry.cycle == 4
        assert ledger.settle(Outcome(d.id, OutcomeStatus.REFUSED, "KEEP_PROMISED")) is None
    assert len(ledger) == 0


def test_ids_stay_unique_an_id_entered_again_replaces_its_entry() -> None:
    d = Directive("e1.x.5", 1, Op.DROP, Key("k"), WORKERS[0], 1, "s", (), (WORKERS[1],))
    ledger = Ledger()
    ledger.add(d, now=0.0)
    ledger.add(Directive("e1.x.6", 1, Op.DROP, Key("k"), WORKERS[1], 1, "s"), now=0.0)
    ledger.add(d, now=1.0)
    assert len(ledger) == 2
    assert ledger.count(Key("k")) == 2
    assert sorted(e.directive.id for e in ledger) == ["e1.x.5", "e1.x.6"]
    entry = ledger.settle(Outcome("e1.x.5", OutcomeStatus.FAILED))
    assert entry is not None
    assert entry.sent_at == 1.0
    assert ledger.in_flight(Key("k")).dropping == {WORKERS[1]}


def test_a_refused_directive_reads_back_whole_across_chunks() -> None:
    """Refusals, failures and expiry give the directive back whole, wherever it sits: spread
    over several chunks of slots, some emptied and freed meanwhile."""
    keys = [Key(f"k{k}") for k in range(6_000)]
    drops = _drops(keys, [f"{k:x}" for k in range(6_000)])
    ledger = Ledger()
    for d in drops:
        ledger.add(d, now=0.0)
    for d in drops[:9_000]:  # empties the first chunks
        ledger.settle(Outcome(d.id, OutcomeStatus.APPLIED, inventory_version=1))
    ledger.observe(lambda worker: 1)
    refused = drops[9_000::997]
    for d in refused:
        entry = ledger.settle(Outcome(d.id, OutcomeStatus.REFUSED, "PINNED"))
        assert entry is not None
        assert entry.directive == d
    left = [d for d in drops[9_000:] if d not in refused]
    assert len(ledger) == len(left)
    assert [e.directive for e in ledger.expire(now=99.0, timeout=30.0)] == left
    assert len(ledger) == 0
    assert ledger.workers() == set()
