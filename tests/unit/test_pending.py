"""The in-flight ledger: what stays pending across cycles and what settles it."""

from __future__ import annotations

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import InFlight, Ledger
from amm_service.decisions.view import Key, WorkerId


def directive(id_: str, op: Op = Op.DROP, worker: str = "a", key: str = "x") -> Directive:
    return Directive(id_, 1, op, Key(key), WorkerId(worker), 10, "sum")


def test_applied_directives_stay_in_flight_until_the_view_shows_them() -> None:
    ledger = Ledger()
    ledger.add(directive("1"), now=0.0)
    ledger.settle(Outcome("1", OutcomeStatus.APPLIED, inventory_version=5))
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("a")}
    ledger.observe({WorkerId("a"): 4}.get)
    assert "1" in ledger
    ledger.observe(
        lambda worker: None
    )  # the worker is not in the view (any more): nothing to judge by
    assert "1" in ledger
    ledger.observe({WorkerId("a"): 5}.get)
    assert "1" not in ledger
    assert ledger.in_flight(Key("x")).dropping == frozenset()


def test_applied_directives_settle_at_the_next_observation_not_when_answered() -> None:
    """A poll made while a cycle plans (a fresh query) must not settle a drop that the cycle's
    older view still shows undone: the cycle would plan it again."""
    ledger = Ledger()
    ledger.add(directive("1"), now=0.0)
    ledger.settle(Outcome("1", OutcomeStatus.APPLIED, inventory_version=5))
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("a")}
    ledger.observe({WorkerId("a"): 9}.get)
    assert len(ledger) == 0


def test_refused_and_failed_directives_settle_at_once() -> None:
    ledger = Ledger()
    ledger.add(directive("1"), now=0.0)
    ledger.add(directive("2", Op.REPLICATE, worker="b"), now=0.0)
    ledger.settle(Outcome("1", OutcomeStatus.REFUSED, "PINNED"))
    ledger.settle(Outcome("2", OutcomeStatus.FAILED, "SOURCE_UNAVAILABLE"))
    assert len(ledger) == 0


def test_unanswered_directives_expire_after_the_timeout() -> None:
    ledger = Ledger()
    ledger.add(directive("1"), now=0.0)
    ledger.add(directive("2", worker="b"), now=10.0)
    assert [e.directive.id for e in ledger.expire(now=31.0, timeout=30.0)] == ["1"]
    assert [e.directive.id for e in ledger] == ["2"]


def test_outcomes_of_unknown_directives_are_ignored() -> None:
    ledger = Ledger()
    assert ledger.settle(Outcome("zzz", OutcomeStatus.APPLIED)) is None


def test_forgetting_a_worker_drops_its_entries() -> None:
    ledger = Ledger()
    ledger.add(directive("1", worker="a"), now=0.0)
    ledger.add(directive("2", Op.REPLICATE, worker="b"), now=0.0)
    assert [e.directive.id for e in ledger.forget_worker(WorkerId("a"))] == ["1"]
    assert ledger.in_flight(Key("x")).replicating == {WorkerId("b")}


def test_directives_of_answering_workers_do_not_expire_they_become_overdue() -> None:
    ledger = Ledger()
    ledger.add(directive("1", worker="a"), now=0.0, cycle=3)
    ledger.add(directive("2", worker="b", key="y"), now=0.0, cycle=3)
    answering = {WorkerId("a")}.__contains__
    assert [e.directive.id for e in ledger.expire(31.0, 30.0, answering)] == ["2"]
    assert [d.id for d in ledger.overdue(31.0, 30.0)] == ["1"]
    assert ledger.overdue(32.0, 30.0) == [], "sent again at 31: its clock started over"
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("a")}
    (entry,) = ledger
    assert (entry.cycle, entry.sent_at) == (3, 31.0)


def test_a_repeated_answer_settles_nothing_twice() -> None:
    ledger = Ledger()
    ledger.add(directive("1"), now=0.0)
    applied = Outcome("1", OutcomeStatus.APPLIED, inventory_version=5)
    assert ledger.settle(applied) is not None
    assert ledger.settle(applied) is None
    assert "1" in ledger


def test_a_directive_sent_again_goes_to_the_back_of_the_line() -> None:
    ledger = Ledger()
    ledger.add(directive("1", worker="a"), now=0.0)
    ledger.add(directive("2", worker="a", key="y"), now=5.0)
    answering = {WorkerId("a")}.__contains__
    assert [d.id for d in ledger.overdue(31.0, 30.0)] == ["1"]
    assert [e.directive.id for e in ledger] == ["2", "1"]
    assert ledger.expire(36.0, 30.0, answering) == []
    assert [d.id for d in ledger.overdue(36.0, 30.0)] == ["2"]
    assert [e.directive.id for e in ledger.expire(70.0, 30.0)] == ["1", "2"]


def test_applied_directives_answered_out_of_version_order_settle_by_version() -> None:
    """Answers usually come in version order; those that do not are still settled exactly when
    the view shows their version, no earlier, no later."""
    ledger = Ledger()
    for n, version in enumerate((7, 3, 9, 5)):
        ledger.add(directive(str(n), key=f"k{n}"), now=0.0)
        ledger.settle(Outcome(str(n), OutcomeStatus.APPLIED, inventory_version=version))
    ledger.observe({WorkerId("a"): 5}.get)
    assert sorted(e.directive.id for e in ledger) == ["0", "2"]
    ledger.add(directive("4", key="k4"), now=0.0)
    ledger.settle(Outcome("4", OutcomeStatus.APPLIED, inventory_version=6))
    ledger.observe({WorkerId("a"): 7}.get)
    assert [e.directive.id for e in ledger] == ["2"]
    ledger.observe({WorkerId("a"): 9}.get)
    assert len(ledger) == 0


def test_applied_directives_that_left_the_ledger_are_not_observed_again() -> None:
    ledger = Ledger()
    ledger.add(directive("1", worker="a"), now=0.0)
    ledger.add(directive("2", worker="a", key="y"), now=0.0)
    ledger.add(directive("3", worker="b", key="z"), now=0.0)
    for n in ("1", "2", "3"):
        ledger.settle(Outcome(n, OutcomeStatus.APPLIED, inventory_version=int(n)))
    assert [e.directive.id for e in ledger.expire(31.0, 30.0, {WorkerId("a")}.__contains__)] == [
        "3"
    ]
    assert [e.directive.id for e in ledger.forget_worker(WorkerId("a"))] == ["1", "2"]
    ledger.add(directive("4", worker="a"), now=40.0)  # a new process of the same worker
    ledger.settle(Outcome("4", OutcomeStatus.APPLIED, inventory_version=8))
    ledger.observe({WorkerId("a"): 2, WorkerId("b"): 9}.get)
    assert [e.directive.id for e in ledger] == ["4"]
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("a")}


def test_a_key_with_several_directives_in_flight_keeps_each_until_settled() -> None:
    ledger = Ledger()
    ledger.add(directive("1", worker="a"), now=0.0)
    ledger.add(directive("2", worker="b"), now=0.0)
    ledger.add(directive("3", Op.REPLICATE, worker="c"), now=0.0)
    a, b, c = WorkerId("a"), WorkerId("b"), WorkerId("c")
    assert ledger.in_flight(Key("x")) == InFlight(frozenset({c}), frozenset({a, b}))
    ledger.settle(Outcome("2", OutcomeStatus.REFUSED, "PINNED"))
    ledger.settle(Outcome("3", OutcomeStatus.FAILED))
    assert ledger.in_flight(Key("x")) == InFlight(frozenset(), frozenset({a}))
    ledger.settle(Outcome("1", OutcomeStatus.REFUSED, "PINNED"))
    assert ledger.in_flight(Key("x")) == InFlight()


def test_copies_applied_on_a_worker_gone_before_a_poll_are_no_longer_in_flight() -> None:
    """A copy whose worker was SIGKILLed before its next poll counted as in flight until the
    worker was dropped: the key was not copied again meanwhile. Its drops, and what is not
    applied yet or went to other workers, stay."""
    ledger = Ledger()
    ledger.add(directive("copy", Op.REPLICATE, worker="b", key="x"), now=0.0)
    ledger.add(directive("drop", Op.DROP, worker="b", key="y"), now=0.0)
    ledger.add(directive("waiting", Op.REPLICATE, worker="b", key="z"), now=0.0)
    ledger.add(directive("elsewhere", Op.REPLICATE, worker="c", key="x"), now=0.0)
    for id_, version in (("copy", 3), ("drop", 4), ("elsewhere", 2)):
        ledger.settle(Outcome(id_, OutcomeStatus.APPLIED, inventory_version=version))
    assert ledger.forget_copies(lambda worker: False) == []
    settled = ledger.forget_copies(lambda worker: worker == WorkerId("b"))
    assert [e.directive.id for e in settled] == ["copy"]
    assert ledger.in_flight(Key("x")).replicating == {WorkerId("c")}
    # The drop stays: b is still listed as holding y, and must not count as a copy of it.
    assert ledger.in_flight(Key("y")).dropping == {WorkerId("b")}
    assert {e.directive.id for e in ledger} == {"drop", "waiting", "elsewhere"}
    assert ledger.forget_copies(lambda worker: worker == WorkerId("b")) == []
    # A later poll of b (it came back) settles the rest as before, the copy skipped.
    ledger.observe({WorkerId("b"): 9, WorkerId("c"): 9}.get)
    assert {e.directive.id for e in ledger} == {"waiting"}


def test_observing_answers_out_of_order_looks_at_one_step_of_entries_at_a_time() -> None:
    """A worker's answers out of version order are settled a step at a time, not sorted first
    in one go (75k entries sorted held the AMM's loop for 25-33 ms), and exactly as before."""
    ledger = Ledger()
    versions = list(range(1, 1001))
    versions[0], versions[-1] = versions[-1], versions[0]  # the first answer came last
    for n, v in enumerate(versions):
        ledger.add(directive(str(n), key=f"k{n}"), now=0.0)
        ledger.settle(Outcome(str(n), OutcomeStatus.APPLIED, inventory_version=v))
    steps = sum(1 for _ in ledger.observing({WorkerId("a"): 500}.get, step=100))
    assert steps == 10, "every one of the 1,000 entries is looked at, 100 a step"
    assert sorted(int(e.directive.id) for e in ledger) == [
        n for n, v in enumerate(versions) if v > 500
    ]


def test_an_id_entered_again_replaces_its_entry_in_every_map() -> None:
    """The ledger once kept the first entry of a repeated id under its key too: the key counted
    a directive too many, and settling the id left the stale copy in flight for good."""
    ledger = Ledger()
    ledger.add(directive("5", worker="a"), now=0.0)
    ledger.add(directive("6", worker="b"), now=0.0)
    ledger.add(directive("5", worker="a"), now=1.0)
    assert len(ledger) == 2
    assert ledger.count(Key("x")) == 2
    entry = ledger.settle(Outcome("5", OutcomeStatus.FAILED))
    assert entry is not None
    assert entry.sent_at == 1.0
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("b")}


def test_adding_many_at_once_is_adding_each_in_turn() -> None:
    """``add_many`` (how a cycle enters its directives) leaves the ledger as ``add`` of each in
    turn does: entries in order, per key, journaled, an id entered again replacing its entry,
    and the journal's limit raised so that no change noted is forgotten."""
    directives = [
        directive("1", Op.DROP, "a", "x"),
        directive("2", Op.DROP, "b", "x"),
        directive("3", Op.REPLICATE, "c", "y"),
        directive("4", Op.DROP, "a", "z"),
        directive("2", Op.DROP, "c", "x"),  # the same id again: replaces its entry
    ] + [directive(f"r{n}", Op.REPLICATE, "d", f"k{n}") for n in range(20_000)]
    one, many = Ledger(), Ledger()
    start, one_start = many.feed, one.feed
    for d in directives:
        one.add(d, now=1.0, cycle=7)
    many.add_many(directives, now=1.0, cycle=7)
    assert [(e.directive, e.sent_at, e.cycle) for e in many] == [
        (e.directive, e.sent_at, e.cycle) for e in one
    ]
    for key in ("x", "y", "z", "k0", "k19999"):
        assert many.in_flight(Key(key)) == one.in_flight(Key(key))
        assert many.count(Key(key)) == one.count(Key(key))
    assert many.in_flight(Key("x")).dropping == {WorkerId("a"), WorkerId("c")}
    assert many.noted_since(*start) == one.noted_since(*one_start)
    # y and the k's (replications), x (the entry replaced left): none forgotten
    assert len(many.changed_since(*start) or ()) == 20_002
    assert many.forget_worker(WorkerId("b")) == []
    many.settle(Outcome("1", OutcomeStatus.REFUSED))
    assert many.count(Key("x")) == 1


def test_drops_the_view_shows_settle_at_once_between_cycles() -> None:
    ledger = Ledger()
    drops = [directive(str(n), key=f"k{n}") for n in range(4)]
    copy = directive("c", Op.REPLICATE, worker="b")
    ledger.add_many([*drops, copy], now=0.0)
    for n, d in enumerate([*drops, copy]):
        ledger.settle(Outcome(d.id, OutcomeStatus.APPLIED, inventory_version=n + 1))
    unanswered = directive("u", key="k9")
    ledger.add(unanswered, now=0.0)
    entries = {e.directive.id: e for e in ledger}
    ledger.drops_shown([entries[i] for i in ("0", "2", "c", "u")])  # only applied drops
    assert sorted(e.directive.id for e in ledger) == ["1", "3", "c", "u"]
    assert ledger.in_flight(Key("k0")) == InFlight()
    assert ledger.in_flight(Key("k1")).dropping == {WorkerId("a")}
    ledger.drops_shown([entries["1"], entries["3"]])
    assert not ledger._applied.get(WorkerId("a"))  # not kept till a poll either
    ledger.observe({WorkerId("a"): 9, WorkerId("b"): 9}.get)
    assert [e.directive.id for e in ledger] == ["u"]


def test_a_cycles_own_drops_settled_while_it_plans_stop_counting_when_its_worker_goes() -> None:
    ledger = Ledger()
    ledger.viewing(3)
    ledger.add_many([directive("1"), directive("2", worker="b")], now=0.0, cycle=3)
    for d in ("1", "2"):
        ledger.settle(Outcome(d, OutcomeStatus.APPLIED, inventory_version=5))
    ledger.drops_shown(list(ledger))
    assert len(ledger) == 0
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("a"), WorkerId("b")}
    ledger.forget_worker(WorkerId("a"))
    assert ledger.in_flight(Key("x")).dropping == {WorkerId("b")}
    ledger.viewed()
    assert ledger.in_flight(Key("x")) == InFlight()
