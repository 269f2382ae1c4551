"""The client against in-process fakes of the AMM and the agents (tests/support/fakes.py).

Covers what the client itself is responsible for: the Dask-style example, ordering, chunked
streaming with checksums, error mapping and the blocking wrapper's lifecycle. What the AMM
decides is covered by test_client_e2e.py against the real service.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest

from amm import AmmError, AsyncClient, Client
from amm.models import address_key
from tests.support.fakes import FakeCluster


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    with FakeCluster(3) as cluster:
        yield cluster


@pytest.fixture
def client(fake: FakeCluster) -> Iterator[Client]:
    with Client(fake.address, timeout=5, chunk_size=3) as c:
        yield c


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_dask_style_example(client: Client, fake: FakeCluster) -> None:
    w1, w2, w3 = client.has_what()
    assert [w1, w2, w3] == sorted(fake.workers, key=address_key)
    client.put("x", b"payload", workers=[w1])
    assert client.has_what() == {w1: ("x",), w2: (), w3: ()}
    assert client.get("x", worker=w2) == b"payload"
    assert client.has_what() == {w1: ("x",), w2: ("x",), w3: ()}
    assert client.who_has("x") == {"x": (w1, w2)}
    client.amm.start()
    assert client.amm.running() is True
    client.amm.stop()
    assert client.amm.running() is False
    report = client.amm.run_once()
    assert report.number == 1
    assert report.rejections[0].op == "drop"
    assert report.duration == pytest.approx(0.012)


def test_put_without_workers_picks_least_managed_memory(client: Client, fake: FakeCluster) -> None:
    w1, w2, w3 = client.has_what()
    client.put("big", b"0123456789", workers=[w1, w2])
    client.put("small", b"s")
    assert client.who_has("small") == {"small": (w3,)}


def test_get_without_worker_reads_from_a_holder(client: Client) -> None:
    w1, *_ = client.has_what()
    value = bytes(range(256)) * 5
    client.put("k", value, workers=[w1])
    assert client.get("k") == value
    assert client.who_has("k") == {"k": (w1,)}


def test_get_checks_the_announced_checksum(client: Client, fake: FakeCluster) -> None:
    w1, *_ = client.has_what()
    client.put("k", b"value", workers=[w1])
    fake.state.workers[w1].corrupt = True
    with pytest.raises(AmmError) as info:
        client.get("k", worker=w1)
    assert info.value.status == grpc.StatusCode.DATA_LOSS


def test_server_errors_keep_their_status(client: Client) -> None:
    w1, *_ = client.has_what()
    client.put("k", b"one", workers=[w1])
    with pytest.raises(AmmError) as info:
        client.put("k", b"two", workers=[w1])
    assert info.value.status == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(AmmError) as info:
        client.who_has(["nope"])
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.message


def test_pin_unpin_forget_workers_status(client: Client) -> None:
    w1, w2, _ = client.has_what()
    client.put("k", b"abc", workers=[w1, w2])
    assert client.pin("k", w1) == 1
    assert client.pin("k", w1) == 2
    assert client.unpin("k", w1) == 1
    workers = client.workers()
    assert [w.address for w in workers] == [w1, w2, workers[2].address]
    assert workers[0].managed_bytes == 3
    assert workers[0].status == "running"
    status = client.status()
    assert status.interval == 0.5
    assert status.measure == "optimistic"
    assert status.totals.workers == 3
    assert client.forget("k") == 2


def test_unreachable_addresses_name_the_address() -> None:
    address = _closed_port()
    with Client(address, timeout=5) as client:
        with pytest.raises(AmmError) as info:
            client.amm.running()
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        assert address in info.value.message
        with pytest.raises(AmmError) as info:
            client.get("k", worker=address)
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        assert info.value.message.startswith(f"worker at {address}: ")


def test_closed_client_refuses_calls_and_close_is_idempotent(fake: FakeCluster) -> None:
    client = Client(fake.address)
    client.close()
    client.close()
    with pytest.raises(AmmError) as info:
        client.amm.running()
    assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION


async def test_async_client(fake: FakeCluster) -> None:
    async with AsyncClient(fake.address, timeout=5) as client:
        w1, *_ = await client.has_what()
        await client.put("x", b"payload", workers=[w1])
        assert await client.get("x") == b"payload"
        assert await client.amm.running() is False
    await client.close()
