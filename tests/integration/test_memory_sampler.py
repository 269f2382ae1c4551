"""``amm.diagnostics.MemorySampler`` against a real AMM and agents (local processes), sync and
async, as Dask users call it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from amm.client import AsyncClient, Client
from amm.cluster import LocalCluster
from amm.diagnostics import MemorySampler
from tests.support.processes import local_cluster
from tests.support.waiting import wait_for

VALUE = b"m" * 300_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(2) as running:
        yield running


def test_sync_sampling_follows_the_clusters_managed_memory(cluster: LocalCluster) -> None:
    ms = MemorySampler()
    with Client(cluster.address) as client:
        with ms.sample("put", client=client, measure="managed", interval=0.05):
            base = ms.samples["put"][0][1]
            client.put("ms-sync", VALUE, workers=[cluster.workers[0]])
            deadline = time.monotonic() + 10
            while ms.samples["put"][-1][1] < base + len(VALUE):
                assert time.monotonic() < deadline, f"no sample saw the put: {ms.samples['put']}"
                time.sleep(0.02)
        client.forget("ms-sync")
    samples = ms.samples["put"]
    assert len(samples) >= 2
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)
    assert max(v for _, v in samples) >= base + len(VALUE)


async def test_async_sampling_and_every_measure(cluster: LocalCluster) -> None:
    ms = MemorySampler()
    async with AsyncClient(cluster.address) as client:
        async with (
            ms.sample("managed", client=client, measure="managed", interval=0.05),
            ms.sample("process", client=client, measure="process", interval=0.05),
            ms.sample("optimistic", client=client, measure="optimistic", interval=0.05),
        ):
            base = ms.samples["managed"][0][1]
            await client.put("ms-async", VALUE, workers=[cluster.workers[1]])
            await wait_for(
                lambda: ms.samples["managed"][-1][1],
                lambda v: v >= base + len(VALUE),
                what="a managed sample with the put",
            )
        await client.forget("ms-async")
    assert set(ms.samples) == {"managed", "process", "optimistic"}
    # Agents are Python processes: tens of MiB each before they hold anything.
    assert min(v for _, v in ms.samples["process"]) > 2 * 10 * 2**20
    assert max(v for _, v in ms.samples["optimistic"]) >= len(VALUE)


def test_without_a_client_it_samples_the_amm_at_amm_address(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMM_ADDRESS", cluster.address)
    ms = MemorySampler()
    with ms.sample(interval=0.05):
        pass
    (label,) = ms.samples
    assert len(ms.samples[label]) >= 2
    assert all(v > 0 for _, v in ms.samples[label])  # process memory, Dask's default measure


async def test_without_a_client_async_too(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMM_ADDRESS", cluster.address)
    ms = MemorySampler()
    async with ms.sample("a", measure="managed", interval=0.05):
        pass
    assert len(ms.samples["a"]) >= 2


async def test_a_client_of_the_wrong_kind_is_refused(cluster: LocalCluster) -> None:
    ms = MemorySampler()
    with Client(cluster.address) as client, pytest.raises(TypeError, match="used as `with`"):
        async with ms.sample(client=client):
            pass
    async with AsyncClient(cluster.address) as aclient:
        with pytest.raises(TypeError, match="used as `async with`"), ms.sample(client=aclient):
            pass
    assert ms.samples == {}


def test_bad_arguments_are_refused() -> None:
    ms = MemorySampler()
    with pytest.raises(ValueError, match="unknown measure 'rss'; choose one of process, managed"):
        ms.sample(measure="rss")
    with pytest.raises(ValueError, match="interval must be a positive"):
        ms.sample(interval=0)
