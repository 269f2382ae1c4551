"""No key is lost while the AMM runs flat out and readers churn: puts, reads through other
workers (which create replicas), pins and unpins, all concurrently with cycles every 10 ms."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import agents, get, put
from tests.support.waiting import wait_for


async def test_churn_loses_nothing_and_settles_to_one_replica(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    config = amm_config(tmp_path, interval="10ms", measure="managed", start=True)
    async with (
        AmmServer(config) as amm,
        agents(4, amm=amm.address, lease=0.5) as pairs,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        addresses = [a.address for a, _ in pairs]
        stubs = [s for _, s in pairs]
        values: dict[str, bytes] = {}
        pins: list[tuple[int, str]] = []

        async def reader(n: int) -> None:
            for i in range(60):
                op = rng.random()
                w = rng.randrange(len(stubs))
                if op < 0.3 or not values:
                    key, value = f"k{n}-{i}", rng.randbytes(rng.randrange(1, 50_000))
                    await put(stubs[w], key, value)
                    values[key] = value
                elif op < 0.8:
                    key = rng.choice(sorted(values))
                    _, data = await get(stubs[w], key)  # fetched via the AMM if missing
                    assert data == values[key]
                elif op < 0.9:
                    key = rng.choice(sorted(values))
                    try:
                        await stubs[w].Pin(agent_pb2.PinRequest(key=key))
                        pins.append((w, key))
                    except grpc.aio.AioRpcError as err:
                        if err.code() != grpc.StatusCode.NOT_FOUND:  # not held there: fine
                            raise
                elif pins:
                    w, key = pins.pop(rng.randrange(len(pins)))
                    await stubs[w].Unpin(agent_pb2.UnpinRequest(key=key))

        await asyncio.gather(*(reader(n) for n in range(4)))
        for w, key in pins:
            await stubs[w].Unpin(agent_pb2.UnpinRequest(key=key))

        async def replicas() -> dict[str, list[str]]:
            resp = await control.WhoHas(control_pb2.WhoHasRequest(fresh=True))
            return {e.key: list(e.workers) for e in resp.entries}

        settled = await wait_for(
            replicas,
            lambda r: set(r) == set(values) and all(len(ws) == 1 for ws in r.values()),
            within=20,
            what="one replica of every key",
        )
        for key, (holder,) in settled.items():
            _, data = await get(stubs[addresses.index(holder)], key)
            assert checksum(data) == checksum(values[key])
        status = await control.GetStatus(control_pb2.GetStatusRequest())
        assert status.cycles > 10
