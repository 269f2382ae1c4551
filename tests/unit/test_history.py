"""The dashboard's history: one sample per cycle, directive counts per cycle, bounded."""

from __future__ import annotations

import json

from amm_service.decisions.directive import Op
from amm_service.decisions.view import Memory, WorkerId, WorkerStatus, WorkerView
from amm_service.runtime.observe.history import WORKER_FIELDS, History
from amm_service.runtime.records.outcomes import Totals


def worker(name: str, managed: int, process: int, **flags: bool) -> WorkerView:
    return WorkerView(
        address=WorkerId(f"127.0.0.1:{len(name)}{ord(name[-1])}"),
        name=name,
        status=WorkerStatus.RUNNING,
        memory=Memory(process=process, managed=managed, limit=1000),
        **flags,  # type: ignore[arg-type]
    )


def record(
    history: History, at: float, totals: Totals, *workers: WorkerView, running: bool = True
) -> None:
    history.record(
        at=at,
        cycle=int(at),
        running=running,
        workers=workers,
        totals=totals,
        rejected=0,
        keys=3,
        replicas=5,
        lost=1,
        goals=(2, 1),
    )


def test_a_sample_counts_what_was_sent_and_refused_since_the_previous_one() -> None:
    history, totals = History(), Totals()
    totals.sent_by_op[Op.REPLICATE] += 4
    totals.sent_by_op[Op.DROP] += 1
    totals.refused += 2
    record(history, 1.0, totals, worker("w1", 10, 50))
    totals.sent_by_op[Op.REPLICATE] += 3
    totals.failed += 1
    record(history, 2.0, totals, worker("w1", 10, 50))
    first, second = history.after(0)
    assert (first.replicated, first.dropped, first.refused) == (4, 1, 2)
    assert (second.replicated, second.dropped, second.refused) == (3, 0, 1)


def test_workers_are_sampled_with_the_amms_verdict_in_name_order() -> None:
    history = History()
    record(
        history,
        1.0,
        Totals(),
        worker("w2", 20, 60, stale=True),
        worker("w1", 10, 50, retiring=True),
    )
    [sample] = history.after(0)
    assert [(w.name, w.status, w.managed, w.process, w.limit) for w in sample.workers] == [
        ("w1", "retiring", 10, 50, 1000),
        ("w2", "stale", 20, 60, 1000),
    ]
    assert dict(zip(WORKER_FIELDS, sample.as_json()["workers"][1], strict=True)) == {
        "name": "w2",
        "address": str(sample.workers[1].address),
        "managed": 20,
        "process": 60,
        "limit": 1000,
        "status": "stale",
    }
    assert (sample.keys, sample.replicas, sample.lost, sample.with_goal, sample.below_goal) == (
        3,
        5,
        1,
        2,
        1,
    )


def test_after_returns_only_newer_samples_and_the_oldest_go_first() -> None:
    history = History(maxlen=3)
    for at in range(1, 6):
        record(history, float(at), Totals())
    assert len(history) == 3
    assert [s.at for s in history.after(0)] == [3.0, 4.0, 5.0]
    assert [s.at for s in history.after(3.5)] == [4.0, 5.0]
    assert history.after(5.0) == []


def test_a_big_cluster_keeps_fewer_samples_within_the_same_memory() -> None:
    history = History(maxlen=100, max_worker_samples=5)
    workers = [worker(f"w{i}", 1, 2) for i in range(2)]
    for at in range(1, 6):
        record(history, float(at), Totals(), *workers)
    assert [s.at for s in history.after(0)] == [4.0, 5.0]
    record(history, 6.0, Totals(), *(worker(f"v{i}", 1, 2) for i in range(9)))
    assert [s.at for s in history.after(0)] == [6.0], "the newest sample stays, whatever its size"


def test_the_json_of_the_newer_samples_is_what_they_hold() -> None:
    history = History()
    for at in (1.0, 2.0, 3.0):
        record(history, at, Totals(), worker("w1", 10, 50))
    decoded = json.loads(history.json_after(1.0))
    assert decoded == {"samples": [s.as_json() for s in history.after(1.0)]}
    assert [s["at"] for s in decoded["samples"]] == [2.0, 3.0]
    assert json.loads(history.json_after(3.0)) == {"samples": []}


def test_a_sample_says_whether_the_amm_was_cycling() -> None:
    history = History()
    assert history.newest == 0.0
    record(history, 1.0, Totals(), worker("w1", 10, 50), running=False)
    record(history, 2.0, Totals(), worker("w1", 10, 50))
    assert [s.running for s in history.after(0)] == [False, True]
    assert [s["running"] for s in json.loads(history.json_after(0))["samples"]] == [False, True]
    assert history.newest == 2.0
