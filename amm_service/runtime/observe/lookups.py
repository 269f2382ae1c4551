"""A fresh answer about a few keys without a poll of every inventory: each agent is asked which of
the keys it holds (``HoldsKeys``), all at once.

A fresh ``who_has`` used to poll every agent, so it waited behind a cycle's poll of the same agent
(polls are serialised per agent), then merged everything that changed since (tens of thousands of
removed keys while a cycle's drops land): seconds at 100k keys. Asking for the keys alone costs a
read of each agent's store, answered between two steps of whatever the agent is doing. The
answers are merged into the cluster state for those keys (``ClusterState.apply_lookup``), so that
what is read next (goals, totals) agrees, without counting as a poll: the next poll brings
whatever changed since the last one over them. Keys with a tombstone are left to the polls, which
tell the tombstone book what became of them (a key put again after a Forget).

Used only when every registered agent serves "key-lookups" and at most ``MAX_KEYS`` keys are asked
(beyond, a poll costs less per key); otherwise the caller polls as before. A worker that does not
answer in time (or has left meanwhile) is taken as the state knows it, as a missed poll would
leave it, and named to the caller: a key no answering worker holds may be on it (``Queries``
then answers UNAVAILABLE, not NOT_FOUND).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from amm.v1 import agent_pb2
from amm_service import wire
from amm_service.decisions.view import ClusterState, Key, KeyReport, WorkerId
from amm_service.runtime.links.agents import AgentLinks, channel_closed
from amm_service.runtime.records.tombstones import TombstoneBook

#: The feature an agent reports when it serves HoldsKeys.
FEATURE = "key-lookups"
#: Most keys asked this way (and HoldsKeysRequest's limit).
MAX_KEYS = 1_000


class KeyLookups:
    """Asks the agents which of a few keys they hold now."""

    def __init__(
        self,
        state: ClusterState,
        links: AgentLinks,
        *,
        timeout: float,
        tombstones: TombstoneBook | None = None,
    ) -> None:
        self._state = state
        self._links = links
        self._timeout = timeout
        self._tombstones = tombstones

    def usable(self, keys: Sequence[str]) -> bool:
        """Whether ``holders`` can answer for ``keys``: a few keys, and every agent serves it."""
        workers = self._state.workers
        return (
            0 < len(keys) <= MAX_KEYS
            and bool(workers)
            and all(FEATURE in w.features for w in workers)
        )

    async def holders(self, keys: Sequence[str]) -> tuple[dict[Key, set[WorkerId]], list[WorkerId]]:
        """(the workers holding each of ``keys`` (absent: none), asked now and merged into the
        state; the workers that did not answer, taken as the state knows them)."""
        wanted = [Key(k) for k in dict.fromkeys(keys)]
        workers = list(self._state.worker_ids)
        # Every call is started here, in this turn of the loop, and awaited in turn: wrapped in
        # tasks (``gather``), each began a turn later, and a turn of the loop is a slice of
        # bulk work or more.
        request = agent_pb2.HoldsKeysRequest(keys=wanted)
        calls = [self._ask(w, request) for w in workers]
        try:
            answers = [await self._answer(call) for call in calls]
        finally:
            for call in calls:  # those still under way when this was cancelled
                if call is not None:
                    call.cancel()
        found: dict[Key, set[WorkerId]] = {}
        silent: list[WorkerId] = []
        state = self._state
        book = self._tombstones
        merged = [k for k in wanted if k not in book] if book else wanted
        for worker, answer in zip(workers, answers, strict=True):
            if answer is None:  # no answer: as the state knows it
                silent.append(worker)
                known = state.keys
                held = [k for k in wanted if (kv := known.get(k)) and worker in kv.holders]
            else:
                incarnation, reports = answer
                held = [r.key for r in reports]
                if book:
                    reports = [r for r in reports if r.key not in book]
                absent = set(merged).difference(held)
                state.apply_lookup(worker, incarnation=incarnation, held=reports, absent=absent)
            for key in held:
                found.setdefault(key, set()).add(worker)
        return found, silent

    def _ask(
        self, worker: WorkerId, request: agent_pb2.HoldsKeysRequest
    ) -> grpc.aio.UnaryUnaryCall[agent_pb2.HoldsKeysRequest, agent_pb2.HoldsKeysResponse] | None:
        """The call asking ``worker`` which of the keys of ``request`` it holds, under way; None
        when it cannot be asked (the links are closing)."""
        try:
            return self._links.quick(worker).HoldsKeys(request, timeout=self._timeout)
        except RuntimeError:
            return None

    async def _answer(
        self,
        call: grpc.aio.UnaryUnaryCall[agent_pb2.HoldsKeysRequest, agent_pb2.HoldsKeysResponse]
        | None,
    ) -> tuple[str, list[KeyReport]] | None:
        """(its incarnation, the keys it holds among those asked); None when it did not
        answer."""
        if call is None:
            return None
        try:
            response = await call
        except grpc.aio.AioRpcError:
            return None
        except asyncio.CancelledError:
            if not channel_closed():
                raise
            return None  # it registered again or left while being asked
        return response.incarnation, wire.key_reports(response.keys)
