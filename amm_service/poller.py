"""Polling the agents: each one's inventory changes and memory, merged into the cluster state.

All agents are polled concurrently, each under its own deadline, so one slow agent delays a cycle
by at most ``timeout``. Polls are incremental (the agent returns what changed since the version we
saw) and serialised per agent, so that two overlapping polls (a cycle and a fresh query) never
apply an older answer after a newer one. A poll also tells the agent the AMM's epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import grpc

from amm.v1 import agent_pb2
from amm_service import wire
from amm_service.agents import AgentLinks
from amm_service.pending import Ledger
from amm_service.view import ClusterState, WorkerId

log = logging.getLogger(__name__)


class Poller:
    """Polls agents and feeds the cluster state and the in-flight ledger."""

    def __init__(
        self,
        state: ClusterState,
        ledger: Ledger,
        links: AgentLinks,
        *,
        epoch: int,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._links = links
        self._epoch = epoch
        self._timeout = timeout
        self._clock = clock
        self._locks: dict[WorkerId, asyncio.Lock] = {}

    async def poll_all(self, workers: Iterable[WorkerId] | None = None) -> list[WorkerId]:
        """Poll ``workers`` (default: all registered); returns those that did not answer."""
        targets = list(self._state.worker_ids if workers is None else workers)
        answered = await asyncio.gather(*(self.poll(w) for w in targets))
        return [w for w, ok in zip(targets, answered, strict=True) if not ok]

    async def poll(self, worker: WorkerId) -> bool:
        lock = self._locks.setdefault(worker, asyncio.Lock())
        async with lock:
            known = self._state.worker(worker)
            if known is None:
                self._locks.pop(worker, None)
                return True
            request = agent_pb2.PollRequest(
                since_version=known.version, incarnation=known.incarnation, epoch=self._epoch
            )
            try:
                resp = await self._links.stub(worker).Poll(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                log.debug("poll of %s failed: %s", worker, err.code().name)
                return False
            if resp.incarnation != known.incarnation:
                # The agent restarted: what was in flight to its old process is moot.
                self._ledger.forget_worker(worker)
            self._state.apply_poll(
                worker,
                incarnation=resp.incarnation,
                version=resp.version,
                full=resp.full,
                keys=wire.key_reports(resp.keys),
                removed=wire.poll_keys_removed(resp),
                memory=wire.memory_from_pb(resp.memory),
                status=wire.status_from_pb(resp.status),
                name=resp.name,
                now=self._clock(),
            )
            self._ledger.observe(worker, resp.version)
            return True
