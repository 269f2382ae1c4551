"""Rebalance over many cycles of a simulated cluster (no network): it converges within the gap,
with a bounded number of moves, never moves a key back and never degrades replication."""

from __future__ import annotations

import random

import pytest

from amm_service.decisions.core import PlanConfig
from amm_service.decisions.view import Key
from amm_service.policies.rebalance import Rebalance
from amm_service.policies.reduce_replicas import ReduceReplicas
from tests.support.simulate import Simulation

MiB = 2**20
GiB = 2**30
LIMIT = 8 * GiB
GAP = 0.10 * LIMIT


def four_gib_on_one_worker(config: PlanConfig, delay: int) -> Simulation:
    """64 keys of 64 MiB on one of four workers with 8 GiB each."""
    return Simulation(
        {"w1": [f"k{i:02}" for i in range(64)], "w2": [], "w3": [], "w4": []},
        [ReduceReplicas(), Rebalance()],
        sizes=64 * MiB,
        limits=LIMIT,
        config=config,
        delay=delay,
    )


@pytest.mark.parametrize(
    ("max_incoming", "max_outgoing", "delay"),
    [(0, 0, 0), (2, 0, 1), (1, 1, 2)],
    ids=["unthrottled", "2-incoming-slow", "1-slot-slower"],
)
def test_four_gib_on_one_worker_ends_within_the_gap(
    max_incoming: int, max_outgoing: int, delay: int
) -> None:
    config = PlanConfig("managed", 1, max_incoming=max_incoming, max_outgoing=max_outgoing)
    sim = four_gib_on_one_worker(config, delay)
    sim.run(max_cycles=200)
    assert sim.spread() <= GAP
    # 48 keys would make the four even; stopping within the gap takes fewer.
    assert len(sim.replications) <= 48
    assert len({d.key for d in sim.replications}) == len(sim.replications)
    assert sim.moved_back == []
    assert min(sim.fewest_copies.values()) == 1
    assert all(landed.refused == [] for landed in sim.landed)
    assert sum(sim.copies().values()) == 64
    # Balanced: cycle after cycle, nothing more to do.
    for _ in range(3):
        assert sim.step().directives == ()


def test_a_balanced_cluster_is_left_alone_from_the_first_cycle() -> None:
    sim = Simulation(
        {w: [f"{w}-{i}" for i in range(16)] for w in ("w1", "w2", "w3", "w4")},
        [ReduceReplicas(), Rebalance()],
        sizes=64 * MiB,
        limits=LIMIT,
    )
    assert sim.run() == 1


def test_keys_held_twice_stay_held_twice() -> None:
    # A quarter of w1's keys also live on w2 (no ReduceReplicas here to thin them out): moving
    # either copy must never leave such a key with a single one.
    twice = [f"k{i:02}" for i in range(0, 64, 4)]
    sim = Simulation(
        {"w1": [f"k{i:02}" for i in range(64)], "w2": twice, "w3": [], "w4": []},
        [Rebalance()],
        sizes=64 * MiB,
        limits=LIMIT,
    )
    sim.run()
    assert {d.key for d in sim.replications} & set(twice)  # some of them did move
    assert all(sim.fewest_copies[Key(k)] == 2 for k in twice)
    assert sim.copies() == sim.initial_copies
    assert sim.moved_back == []
    assert sim.spread() <= GAP


@pytest.mark.parametrize("seed", range(12))
def test_random_clusters_settle_without_moving_any_key_back(seed: int) -> None:
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(rng.randint(2, 7))]
    holdings: dict[str, list[str]] = {w: [] for w in workers}
    sizes: dict[str, int] = {}
    crowded = workers[: rng.randint(1, len(workers))]  # the rest start empty
    for i in range(rng.randint(20, 150)):
        sizes[f"k{i}"] = rng.randint(1, 96) * MiB
        holdings[rng.choice(crowded)].append(f"k{i}")
    sim = Simulation(
        holdings,
        [ReduceReplicas(), Rebalance()],
        sizes=sizes,
        limits={w: rng.choice([4, 8, 16, 0]) * GiB for w in workers},
        config=PlanConfig("managed", 1, max_incoming=rng.choice([0, 1, 3])),
        delay=rng.choice([0, 1, 2]),
    )
    sim.run(max_cycles=400)
    assert sim.moved_back == []
    assert len({d.key for d in sim.replications}) == len(sim.replications)  # each moves once
    assert min(sim.fewest_copies.values()) == 1
    assert sum(sim.copies().values()) == len(sizes)
    assert all(landed.refused == [] for landed in sim.landed)
