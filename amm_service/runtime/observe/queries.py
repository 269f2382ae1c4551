"""What operators ask about the cluster's data, and the two commands that act on keys.

``workers``, ``who_has`` and ``has_what`` answer from the live cluster state (after a poll of
every agent when asked for fresh answers); ``forget`` deletes every replica of keys through the
agents and leaves tombstones so that copies under way do not bring them back; ``replicate`` and
``goal_statuses`` set and report replication goals; ``lost`` lists the keys lost (a key asked
for that is lost is NOT_FOUND, and the message says it is lost). None of them runs a cycle or
sends a directive: they read what the cycles keep up to date, or act directly.

Not covered: the worker registry (``membership``) and the cycles (``cycling``), retiring workers
(``retirement_driver``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Sequence

import grpc

from amm.v1 import agent_pb2
from amm_service.decisions.view import Goal, Key, KeyView, WorkerId, WorkerView
from amm_service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, listing
from amm_service.policies.goals import GoalStatus, describe
from amm_service.runtime.links.addresses import address_order
from amm_service.runtime.links.agents import channel_closed
from amm_service.runtime.links.reach import Links
from amm_service.runtime.loop.pacing import urgent
from amm_service.runtime.observe.lookups import KeyLookups
from amm_service.runtime.records.goals import check_goal
from amm_service.runtime.records.kept import Records
from amm_service.runtime.records.lost import LostKey
from amm_service.runtime.records.tombstones import PUSH_KEYS


class Queries:
    """The AMM's queries and key commands; ``check_open`` raises while the AMM cannot serve."""

    def __init__(
        self,
        records: Records,
        links: Links,
        *,
        poll_timeout: float,
        check_open: Callable[[], None],
        wake: Callable[[], None] = lambda: None,
        cycle_lock: asyncio.Lock | None = None,
    ) -> None:
        self._wake = wake
        self._tombstones = records.tombstones
        self._cycle_lock = cycle_lock or asyncio.Lock()
        self._state = records.state
        self._poller = links.poller
        self._links = links.agents
        self._goals = records.goals
        self._lost = records.lost
        self._events = records.events
        self._poll_timeout = poll_timeout
        self._check_open = check_open
        self._lookups = KeyLookups(
            self._state, self._links, timeout=poll_timeout, tombstones=self._tombstones
        )

    async def refresh(self, fresh: bool) -> list[WorkerId]:
        """With ``fresh``, poll every agent first; the workers that did not answer. Queries then
        read the live state directly: they do not await while answering, so it cannot change
        under them, and a snapshot (a copy of every key) per query would be wasted work."""
        self._check_open()
        return await self._poller.poll_all() if fresh else []

    async def workers(self, *, fresh: bool = False) -> list[WorkerView]:
        await self.refresh(fresh)
        return sorted(self._state.workers, key=lambda w: address_order(w.address))

    async def who_has(
        self, keys: Sequence[str], *, fresh: bool
    ) -> list[tuple[Key, tuple[WorkerId, ...]]]:
        """The holders of ``keys`` (every key when empty). Fresh, for a few keys, each agent is
        asked which of them it holds (``lookups``) rather than polled: the answer is as of call
        time all the same, without waiting behind a cycle's polls."""
        if fresh and self._lookups.usable(keys):
            self._check_open()
            with urgent():  # the agents' answers come before the bulk work under way
                found, silent = await self._lookups.holders(keys)
            unknown = [k for k in keys if Key(k) not in found]
            if unknown:
                raise self._unknown(unknown, silent)
            return [(Key(k), tuple(sorted(found[Key(k)], key=address_order))) for k in keys]
        silent = await self.refresh(fresh)
        known = self._known(keys, silent)
        return [(kv.key, tuple(sorted(kv.holders, key=address_order))) for kv in known]

    async def lookup(self, keys: Sequence[str], *, fresh: bool) -> list[KeyView]:
        """What is known of ``keys`` (content, holders, conflicting holders), in the order
        asked; unknown keys are left out. Agents ask it before they store or delete a key."""
        await self.refresh(fresh)
        known = self._state.keys
        return [kv for kv in (known.get(Key(k)) for k in keys) if kv is not None]

    async def has_what(
        self, workers: Sequence[str], *, fresh: bool
    ) -> list[tuple[WorkerId, tuple[Key, ...]]]:
        if any(not w for w in workers):
            raise InvalidArgument("worker addresses must not be empty strings")
        await self.refresh(fresh)
        known = set(self._state.worker_ids)
        if workers:
            wanted = [WorkerId(w) for w in workers]
        else:
            # Not the workers of an earlier run that have not shown up in this one: listed as
            # holding nothing, they read as live workers until the liveness rules remove them.
            confirmed = {w.address for w in self._state.workers if w.confirmed}
            wanted = sorted(confirmed, key=address_order)
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise NotFound(f"unknown worker(s): {listing(unknown)}")
        held = self._state.held_by_each(wanted)
        return [(w, tuple(sorted(held[w]))) for w in wanted]

    async def forget(self, keys: Sequence[str]) -> int:
        """Delete every replica of ``keys``; fails listing the replicas that could not go.

        Their goals go first: a cycle between two deletes must not copy the key back. Then a
        tombstone per key (``tombstones``), entered between two cycles so that no later one
        plans a copy, and taken by every agent at a poll before anything else: each deletes its
        copy, unless pinned, and discards the copies it had under way. Copies left (pinned, on
        an agent that cannot be reached or does not take tombstones) are deleted one by one, and
        those that cannot be are listed in the error."""
        if not keys:
            raise InvalidArgument("no keys given")
        silent = await self.refresh(True)
        # Forgetting a lost key is how an operator says it is not coming back (and a key not
        # seen since the AMM restarted, that it is not awaited).
        lost = {k for k in keys if Key(k) not in self._state.keys and self._lost.knows(Key(k))}
        remaining = [k for k in keys if k not in lost]
        if remaining:
            self._known(remaining, silent)  # unknown keys fail here, before anything changes
        self._lost.discard(Key(k) for k in lost)
        self._goals.remove(keys)
        forgotten = [Key(k) for k in dict.fromkeys(keys)]
        before = self._replicas(forgotten)
        async with self._cycle_lock:
            self._tombstones.bury(forgotten)
        for _ in range(math.ceil(len(forgotten) / PUSH_KEYS)):  # a poll carries so many
            await self._poller.poll_all()
        left = sorted(self._replicas(forgotten))
        results = await asyncio.gather(*(self._delete(k, w) for k, w in left))
        failures = [r for r in results if isinstance(r, str)]
        if left:
            await self._poller.poll_all({w for _, w in left})
        still = self._replicas(forgotten)
        deleted = len(before - still) + sum(
            1 for pair, r in zip(left, results, strict=True) if r is True and pair not in before
        )
        self._events.record(
            "keys-forgotten",
            f"{len(forgotten)} key(s) forgotten: {deleted} replica(s) deleted"
            + (f", {len(failures)} could not be" if failures else ""),
            keys=forgotten,
        )
        if failures:
            raise FailedPrecondition(
                f"deleted {deleted} replica(s) but not: " + "; ".join(failures[:10])
            )
        return deleted

    def _replicas(self, keys: Sequence[Key]) -> set[tuple[Key, WorkerId]]:
        """The (key, worker) of every copy of ``keys`` the state knows of."""
        found = self._state.keys
        return {(k, w) for k in keys if (kv := found.get(k)) is not None for w in kv.holders}

    async def replicate(self, keys: Sequence[str], n: Goal) -> tuple[int, int]:
        """Set the replication goal of ``keys`` (1 removes it); returns (set, removed).

        A key must be held by some worker, or already have a goal (so that the goal of a key
        that was lost can still be removed). Agents are polled first if a key is not known yet:
        a value put a moment ago must not be reported unknown."""
        self._check_open()
        if not keys:
            raise InvalidArgument("no keys given")
        check_goal(n)
        silent: list[WorkerId] = []
        if any(Key(k) not in self._state.keys and k not in self._goals for k in keys):
            silent = await self.refresh(True)
        unknown = [k for k in keys if Key(k) not in self._state.keys and k not in self._goals]
        if unknown:
            if silent:
                raise self._unanswered(unknown, silent)
            raise NotFound(f"unknown key(s): {listing(unknown)}")
        changed, removed = self._goals.set(keys, n)
        if changed or removed:
            self._wake()  # the AMM acts on the goals at its next cycle: now
        if changed:
            self._events.record(
                "goal-set", f"goal of {describe(n)} for {changed} key(s)", keys=keys
            )
        if removed:
            self._events.record("goal-removed", f"goal removed for {removed} key(s)", keys=keys)
        return changed, removed

    async def goal_statuses(self, keys: Sequence[str], *, fresh: bool = False) -> list[GoalStatus]:
        """The goals of ``keys`` (every goal when empty), how far each key is from it, and whether
        it is lost; with ``fresh``, live copies as of a poll now, so that it agrees with a fresh
        ``who_has``."""
        self._check_open()
        await self.refresh(fresh)
        present = self._state.keys
        return [
            dataclasses.replace(s, lost=True) if s.key in self._lost and s.key not in present else s
            for s in self._goals.statuses(keys, self._state)
        ]

    async def lost(
        self, keys: Sequence[str], *, after: str = "", limit: int
    ) -> tuple[list[tuple[LostKey, bool]], int]:
        """(up to ``limit`` lost keys among ``keys`` (all when empty) ordered by key after
        ``after``, each with whether it has a goal; how many are lost in all)."""
        self._check_open()
        if limit < 1:
            raise InvalidArgument(f"limit must be at least 1, not {limit}")
        found, total = self._lost.listed(
            [Key(k) for k in keys], present=self._state.keys, after=after, limit=limit
        )
        return [(r, r.key in self._goals) for r in found], total

    def _known(self, keys: Sequence[str], silent: Sequence[WorkerId] = ()) -> list[KeyView]:
        """The state of ``keys`` (every key, ordered, when empty); NotFound lists the unknown
        (Unavailable if ``silent`` workers, asked just now, did not answer)."""
        if not keys:
            return [kv for _, kv in sorted(self._state.keys.items())]
        found = [self._state.keys.get(Key(k)) for k in keys]
        unknown = [k for k, kv in zip(keys, found, strict=True) if kv is None]
        if unknown:
            raise self._unknown(unknown, silent)
        return [kv for kv in found if kv is not None]

    @staticmethod
    def _unanswered(unknown: Sequence[str], silent: Sequence[WorkerId]) -> Unavailable:
        """The error for keys no worker that answered holds: a worker that was asked and did not
        answer (slow, just restarted, or dead but not declared so yet) may hold them, and
        NOT_FOUND would be a wrong answer; asking again is how to know."""
        workers = sorted(silent, key=address_order)
        return Unavailable(
            f"cannot tell whether any worker holds {listing(unknown)}: {listing(workers)} did"
            " not answer in time; ask again"
        )

    def _unknown(
        self, unknown: Sequence[str], silent: Sequence[WorkerId] = ()
    ) -> NotFound | Unavailable:
        """The error for keys no worker holds, saying which of them are lost; Unavailable when
        ``silent`` workers, asked just now, did not answer."""
        if silent:
            return self._unanswered(unknown, silent)
        lost = [k for k in unknown if Key(k) in self._lost]
        said = (
            f"; lost: {listing(lost)} (the last worker holding it went away: `amm lost` says how)"
            if lost
            else ""
        )
        return NotFound(f"unknown key(s): {listing(unknown)}{said}")

    async def _delete(self, key: str, worker: WorkerId) -> bool | str:
        try:
            resp = await self._links.stub(worker).Delete(
                agent_pb2.DeleteRequest(key=key, forget=True), timeout=self._poll_timeout * 5
            )
        except grpc.aio.AioRpcError as err:
            return f"{key!r} on {worker}: {err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            if not channel_closed():
                raise
            return f"{key!r} on {worker}: it registered again or left while being asked"
        return bool(resp.deleted)
