"""An agent holding many keys keeps them out of the garbage collector's full collections: each
walked its whole store with the loop held (30-40 ms every second or so while it dropped 100k
keys), and a HoldsKeys or a poll waited as long."""

from __future__ import annotations

import asyncio
import gc

from amm.base.checksum import checksum
from tests.support.agent import running_agent
from worker_agent.agent import FREEZE_FROM
from worker_agent.store import Key


async def test_a_big_store_is_frozen_out_of_full_collections() -> None:
    gc.unfreeze()
    try:
        async with running_agent(memory_interval=0.05) as agent:
            data = b"v"
            digest = checksum(data)
            agent.node.put_many([(Key(f"k{i:06d}"), data, digest) for i in range(FREEZE_FROM)])
            values = [agent.node.store.get(Key(f"k{i:06d}")) for i in range(100)]
            deadline = asyncio.get_running_loop().time() + 30
            while gc.get_freeze_count() < FREEZE_FROM:
                assert asyncio.get_running_loop().time() < deadline, "the heap was never frozen"
                await asyncio.sleep(0.05)
            # What the store holds is among what is frozen (a tracked object that a full
            # collection no longer walks).
            walked = {id(o) for o in gc.get_objects(generation=2)}
            assert all(gc.is_tracked(v) and id(v) not in walked for v in values)
    finally:
        gc.unfreeze()
