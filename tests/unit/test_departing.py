"""Departures begun together (``Departing``): the task that makes their passes has an owner
that ends it."""

from __future__ import annotations

import asyncio

from amm_service.decisions.view import ClusterState, WorkerId
from amm_service.runtime.workers.membership import Departing

W = WorkerId("127.0.0.1:7001")


def _passes() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "departures" and not t.done()]


async def test_closing_ends_the_passes_task_resting_after_a_pass() -> None:
    state = ClusterState()
    state.register(W, "w", "i1", now=0.0)
    departing = Departing(state, share=1e-6)  # after each pass, a rest a million times longer
    departure = await departing.begin(W)
    assert departure.worker == W
    assert _passes(), "the task rests after its pass"
    await departing.close()
    assert not _passes()
