"""Forget sticks: copies in flight when a key is forgotten never bring it back.

Real agent processes race a Forget against the copies the AMM ordered for a replication goal,
and against reads through workers that lack the key (each fetches it from a peer and keeps a
replica). Once every transfer is over, no forgotten key is held anywhere, and it stays so over
later cycles; a later explicit Put of the same key is a key like any other again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from amm.client import AsyncClient
from amm.cluster import LocalCluster
from amm.errors import AmmError
from amm_service.api.server import AmmServer
from tests.conftest import amm_config, free_port
from tests.support.agent import running_agent
from tests.support.processes import local_cluster
from tests.support.waiting import wait_for

KEYS = [f"f-{i:02}" for i in range(20)]
VALUE = b"\x17" * (2 * 1024 * 1024)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(4, interval=0.1) as running:
        yield running


async def settled(client: AsyncClient) -> None:
    """Every directive sent has an outcome (the copies ordered are over, one way or another)."""

    async def unanswered() -> int:
        t = (await client.status()).totals
        return t.directives_sent - t.directives_applied - t.directives_refused - t.directives_failed

    await wait_for(unanswered, lambda n: n == 0, within=30, what="every directive answered")


async def held(client: AsyncClient, keys: list[str]) -> dict[str, tuple[str, ...]]:
    """Who holds any of ``keys``, polled afresh."""
    holders = await client.who_has(fresh=True)
    return {k: h for k, h in holders.items() if k in keys and h}


async def test_copies_for_a_goal_in_flight_do_not_bring_forgotten_keys_back(
    cluster: LocalCluster,
) -> None:
    w1 = cluster.workers[0]
    async with AsyncClient(cluster.address) as client:
        await client.put_many(dict.fromkeys(KEYS, VALUE), workers=[w1])
        await client.replicate(KEYS)  # a copy on every worker
        report = await client.amm.run_once(wait=False)  # sent; the copies are under way
        assert report.directives_sent == 30  # 10 to each of the others: the transfer limit
        await client.forget(KEYS)
        await settled(client)
        assert await held(client, KEYS) == {}
        for _ in range(3):  # and no later cycle copies them back either
            report = await client.amm.run_once()
            assert report.directives_sent == 0
        assert await held(client, KEYS) == {}


async def test_reads_through_workers_in_flight_do_not_bring_forgotten_keys_back(
    cluster: LocalCluster,
) -> None:
    w1, *others = cluster.workers
    async with AsyncClient(cluster.address) as client:
        await client.put_many(dict.fromkeys(KEYS, VALUE), workers=[w1])
        reads = [
            asyncio.ensure_future(client.prefetch(k, w, sources=[w1])) for k in KEYS for w in others
        ]
        await client.forget(KEYS)
        results = await asyncio.gather(*reads, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        # A read that came once the key was gone fails as it should; nothing else may.
        assert all(
            isinstance(r, AmmError) and r.status == grpc.StatusCode.NOT_FOUND for r in failed
        )
        assert await held(client, KEYS) == {}
        await client.amm.run_once()
        assert await held(client, KEYS) == {}


async def test_a_key_put_again_after_a_forget_is_a_key_like_any_other(
    cluster: LocalCluster,
) -> None:
    w1, w2, *_ = cluster.workers
    async with AsyncClient(cluster.address) as client:
        await client.put("again", b"first", workers=[w1])
        await client.forget("again")
        await client.put("again", b"second", workers=[w2])
        assert await client.get("again") == b"second"
        await client.replicate("again", n=2)
        report = await client.amm.run_once()
        assert report.applied == 1
        holders = (await held(client, ["again"]))["again"]
        assert len(holders) == 2
        # A read through another worker keeps its replica again.
        third = next(w for w in cluster.workers if w not in holders)
        assert (await client.prefetch("again", third)).fetched
        assert third in (await held(client, ["again"]))["again"]


async def test_an_amm_restarted_sends_its_tombstones_again_without_undoing_a_put(
    tmp_path: Path,
) -> None:
    """The tombstones are in the state file; every agent gets them again, and one that put the
    key since keeps it (it knows that tombstone by its id): the restarted AMM sees the put."""
    # Back at the same address: agents take epochs only from the AMM they are configured with.
    config = amm_config(tmp_path, listen=f"127.0.0.1:{free_port()}")
    async with AsyncExitStack() as agents:
        async with AmmServer(config) as first, AsyncClient(first.address) as client:
            a, b = [
                await agents.enter_async_context(running_agent(amm=first.address)) for _ in "ab"
            ]
            await wait_for(lambda: a.registered and b.registered, what="registered")
            await client.put("k", b"first", workers=[a.address])
            await client.forget("k")
            await client.put("k", b"second", workers=[b.address])  # first never polls b again
        async with AmmServer(config) as second, AsyncClient(second.address) as client:
            assert await held(client, ["k"]) == {"k": (b.address,)}
            assert await client.get("k") == b"second"
            await client.replicate("k", n=2)
            assert (await client.amm.run_once()).applied == 1
            assert sorted((await held(client, ["k"]))["k"]) == sorted([a.address, b.address])
