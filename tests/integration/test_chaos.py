"""The chaos run of ``benchmarks/chaos.py``, short: every kind of fault against real processes,
and the invariant checked afterwards. The long run (200 episodes) is the benchmark's."""

from __future__ import annotations

import signal

import pytest

from amm.client import Client
from benchmarks.chaos import FAULTS, Episode, Figures


@pytest.mark.timeout(240)
def test_every_fault_kind_keeps_acknowledged_keys_or_reports_them_lost() -> None:
    figures = Figures()
    for i, kinds in enumerate((("kill", "amm", "forget"), ("restart", "freeze", "term"))):
        figures.add(Episode(f"test:{i}", kinds).run())
    assert figures.failures == []
    assert figures.ok
    assert set(figures.faults) == set(FAULTS)
    assert figures.readable > 0
    assert figures.keys_checked == figures.readable + figures.really_lost


@pytest.mark.timeout(120)
def test_the_check_catches_a_silent_loss_and_a_forgotten_key_back() -> None:
    """The checker itself: a key lost with an agent nobody noted as destroyed is lost wrongly,
    and a forgotten key stored again behind the episode's back counts as come back."""
    episode = Episode("check:0", ())
    with episode.cluster() as cluster, Client(cluster.address, timeout=10) as client:
        first, second = cluster.workers[:2]
        client.put("silent", b"x" * 1000, workers=first)
        client.put("zombie", b"z" * 1000, workers=second)
        client.put("kept", b"k" * 1000, workers=second)
        episode.values.update({"silent": b"x" * 1000, "zombie": b"z" * 1000, "kept": b"k" * 1000})
        episode.forget(client, ["zombie"])
        client.put("zombie", b"z" * 1000, workers=second)  # a resurrection, as a bug would
        cluster.stop_worker(first, signal.SIGKILL)  # no snapshot: a loss nobody caused
        episode.check(cluster, client, within=15)
    figures = episode.figures
    assert figures.readable == 1  # "kept"
    assert (figures.really_lost, figures.reported_lost, figures.lost_wrongly) == (1, 1, 1)
    assert figures.forgotten_back == 1
    assert not figures.ok
