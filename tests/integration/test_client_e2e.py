"""The client, the CLI and the demo against a real local cluster (service and agent processes).

Skipped, with the reason, while ``amm_service.__main__`` or ``worker_agent.__main__`` is missing;
they run as soon as both exist. Cycles are driven by ``run_once`` except where the point is that
the AMM runs on its own, and positives are awaited with ``poll_until``.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import grpc
import pytest

from amm import AmmError, AsyncClient, Client
from amm.cli import main as cli_main
from amm.cluster import LocalCluster
from amm.models import sort_addresses
from tests.support.processes import local_cluster, poll_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(2) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.address, timeout=10) as c:
        c.amm.stop()
        yield c
        c.amm.stop()


def test_the_dask_style_example(client: Client, cluster: LocalCluster) -> None:
    w1, w2 = client.has_what()
    assert [w1, w2] == sort_addresses(cluster.workers)
    client.put("example", b"payload", workers=[w1])
    assert client.has_what()[w1] == ("example",)
    assert client.get("example", worker=w2) == b"payload"
    assert client.who_has("example") == {"example": (w1, w2)}
    client.amm.start()
    assert client.amm.running() is True
    client.amm.stop()
    assert client.amm.running() is False
    report = client.amm.run_once()
    assert report.number > 0
    poll_until(lambda: len(client.who_has("example")["example"]) == 1, what="one replica left")


def test_running_amm_drops_the_duplicate_by_itself(client: Client) -> None:
    w1, w2 = client.has_what()
    client.put("dup", b"v" * 10_000, workers=[w1, w2])
    client.amm.start()

    def single_holder() -> tuple[str, ...] | None:
        holders = client.who_has("dup")["dup"]
        return holders if len(holders) == 1 else None

    holders = poll_until(single_holder, what="the duplicate dropped")
    assert holders[0] in (w1, w2)


def test_put_and_get_without_naming_workers(client: Client) -> None:
    value = bytes(range(256)) * 9000
    client.put("anywhere", value)
    (holder,) = client.who_has("anywhere")["anywhere"]
    assert client.get("anywhere") == value
    assert client.who_has("anywhere")["anywhere"] == (holder,)
    client.forget("anywhere")


def test_status_workers_and_errors(client: Client, cluster: LocalCluster) -> None:
    status = client.status()
    assert status.totals.workers == 2
    assert [p.name for p in status.policies]
    workers = client.workers(fresh=True)
    assert [w.address for w in workers] == sort_addresses(cluster.workers)
    assert all(w.status == "running" and w.last_poll is not None for w in workers)
    with pytest.raises(AmmError) as info:
        client.who_has(["no-such-key"])
    assert info.value.status == grpc.StatusCode.NOT_FOUND


def test_pin_and_unpin(client: Client) -> None:
    w1, _ = client.has_what()
    client.put("pinned", b"p", workers=[w1])
    assert client.pin("pinned", w1) == 1
    assert client.unpin("pinned", w1) == 0
    client.forget("pinned")


def test_stopped_worker_leaves_the_cluster(cluster: LocalCluster, client: Client) -> None:
    extra = cluster.add_worker()
    assert extra in client.has_what()
    assert cluster.stop_worker(extra, signal.SIGTERM) == 0
    poll_until(lambda: extra not in client.has_what(), what="the worker unregistered")
    with pytest.raises(AmmError) as info:
        client.get("anything", worker=extra)
    assert info.value.status == grpc.StatusCode.UNAVAILABLE
    assert extra in info.value.message


async def test_async_client(cluster: LocalCluster) -> None:
    async with AsyncClient(cluster.address, timeout=10) as client:
        w1, _ = await client.has_what()
        await client.put("async", b"value", workers=[w1])
        assert await client.get("async") == b"value"
        assert await client.forget("async") == 1


def test_cli_verbs(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    amm = ["--amm", cluster.address]
    w1 = sort_addresses(cluster.workers)[0]
    assert cli_main([*amm, "put", "cli", "--value", "text", "--worker", w1]) == 0
    assert cli_main([*amm, "who-has", "cli"]) == 0
    assert cli_main([*amm, "workers"]) == 0
    assert cli_main([*amm, "status"]) == 0
    assert cli_main([*amm, "run-once"]) == 0
    out = capsys.readouterr().out
    assert f"cli  {w1}" in out
    assert "ADDRESS" in out
    assert "cycle" in out
    assert cli_main([*amm, "forget", "cli"]) == 0
    assert cli_main([*amm, "who-has", "cli"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")
