"""Mapping a trace onto agents, and the books of which keys live while a replay runs."""

from __future__ import annotations

import pytest

from amm.replay.plan import Lifetimes, Scale, make_plan
from amm.replay.trace import TRACE_FORMAT, Trace, parse_trace


def chain_trace() -> Trace:
    """a and b (roots) -> c reads both -> d reads c; e reads a; d is the output."""
    return parse_trace(
        {
            "format": TRACE_FORMAT,
            "outputs": ["d"],
            "tasks": [
                {
                    "key": "a",
                    "worker": "0",
                    "queued": 0.0,
                    "start": 0.0,
                    "stop": 1.0,
                    "inputs": [],
                    "nbytes": 800,
                },
                {
                    "key": "b",
                    "worker": "1",
                    "queued": 0.0,
                    "start": 0.5,
                    "stop": 1.5,
                    "inputs": [],
                    "nbytes": 400,
                },
                {
                    "key": "c",
                    "worker": "2",
                    "queued": 1.6,
                    "start": 1.5,
                    "stop": 2.0,
                    "inputs": ["a", "b"],
                    "nbytes": 8,
                },
                {
                    "key": "d",
                    "worker": "3",
                    "queued": None,
                    "start": 3.0,
                    "stop": 4.0,
                    "inputs": ["c"],
                    "nbytes": 0,
                },
                {
                    "key": "e",
                    "worker": "4",
                    "queued": 1.2,
                    "start": 1.2,
                    "stop": 1.3,
                    "inputs": ["a"],
                    "nbytes": 3,
                },
            ],
        }
    )


def test_recorded_workers_map_round_robin_onto_agents() -> None:
    plan = make_plan(chain_trace(), 2, Scale(), "p")
    assert dict(plan.worker_map) == {"0": 0, "1": 1, "2": 0, "3": 1, "4": 0}
    assert {s.recorded_key: s.worker for s in plan.steps} == {
        "a": 0,
        "b": 1,
        "c": 0,
        "d": 1,
        "e": 0,
    }


def test_keys_get_the_run_prefix() -> None:
    plan = make_plan(chain_trace(), 5, Scale(), "run-1")
    c = next(s for s in plan.steps if s.recorded_key == "c")
    assert c.key == "run-1/c"
    assert c.inputs == ("run-1/a", "run-1/b")
    assert plan.outputs == ("run-1/d",)


def test_times_and_sizes_scale_and_queue_times_are_repaired() -> None:
    plan = make_plan(chain_trace(), 5, Scale(time=0.5, bytes=0.01), "p")
    steps = {s.recorded_key: s for s in plan.steps}
    assert (steps["a"].start, steps["a"].duration, steps["a"].nbytes) == (0.0, 0.5, 8)
    assert steps["b"].nbytes == 4
    # A non-empty value never shrinks to nothing; an empty one stays empty.
    assert steps["c"].nbytes == 1
    assert steps["d"].nbytes == 0
    # Recorded after its start (clock skew): queued at its start instead.
    assert steps["c"].queued == steps["c"].start == 0.75
    # Not recorded: queued once its last input was produced.
    assert steps["d"].queued == 2.0 * 0.5
    assert plan.makespan == 2.0
    assert plan.total_bytes == 8 + 4 + 1 + 0 + 1


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="positive number"):
        Scale(time=bad)
    with pytest.raises(ValueError, match="positive number"):
        Scale(bytes=bad)


def test_a_plan_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        make_plan(chain_trace(), 0, Scale(), "p")


def test_a_key_is_forgotten_once_its_last_consumer_finished() -> None:
    plan = make_plan(chain_trace(), 5, Scale(), "p")
    books = Lifetimes(plan)
    assert books.produced("p/a") == []
    assert books.produced("p/b") == []
    assert books.produced("p/c") == []
    # c read a and b; a still has a reader (e), b does not.
    assert books.finished("p/c") == ["p/b"]
    assert books.live == {"p/a", "p/c"}
    assert books.produced("p/e") == ["p/e"]  # nobody reads e, and it is not an output
    assert books.finished("p/e") == ["p/a"]
    assert books.produced("p/d") == []
    assert books.finished("p/d") == ["p/c"]
    assert books.live == {"p/d"}  # the output stays


def test_the_books_refuse_impossible_events() -> None:
    books = Lifetimes(make_plan(chain_trace(), 5, Scale(), "p"))
    books.produced("p/a")
    with pytest.raises(ValueError, match="produced twice"):
        books.produced("p/a")
    with pytest.raises(KeyError, match="not a step"):
        books.produced("p/zzz")
    books.produced("p/b")
    books.finished("p/c")
    with pytest.raises(ValueError, match="no reader left"):
        books.finished("p/c")


def test_the_end_check_finds_missing_and_unexpected_keys_under_its_prefix_only() -> None:
    books = Lifetimes(make_plan(chain_trace(), 5, Scale(), "p"))
    for key in ("p/a", "p/b", "p/c"):
        books.produced(key)
    books.finished("p/c")
    good = books.check({"p/a": ("w1",), "p/c": ("w2", "w3"), "other/x": ("w1",)}, "p")
    assert good.ok
    assert good.describe() == "ok: exactly the 2 expected key(s) exist"
    bad = books.check({"p/a": ("w1",), "p/c": (), "p/b": ("w1",), "pp/z": ("w1",)}, "p")
    assert not bad.ok
    assert bad.missing == {"p/c"}
    assert bad.extra == {"p/b"}
    assert bad.describe() == "FAILED: 1 missing: p/c; 1 unexpected: p/b"
