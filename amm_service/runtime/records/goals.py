"""The tracked replication goals: validated, kept in memory for the cycles, persisted in the state.

``Replicate`` (the RPC) sets a goal; the Replicate policy keeps it every cycle. The in-memory
mapping is what cycles snapshot; the state store is written first, so a goal acknowledged to a
caller survives an AMM restart. A goal of 1 copy is no goal (ReduceReplicas keeps one copy
anyway), so ``n = 1`` removes it. Lookups cost O(keys asked) or O(goals), never O(cluster keys).

Not covered: what a goal means for a cycle (``policies.goals``, ``policies.replication``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from amm_service.decisions.view import ClusterState, Goal, Key
from amm_service.errors import InvalidArgument, NotFound, listing
from amm_service.policies.goals import GoalCounter, GoalStatus
from amm_service.runtime.records.state import StateStore


def check_goal(n: Goal) -> None:
    """InvalidArgument unless ``n`` is a goal a caller may ask for: None or at least 1."""
    if n is not None and n < 1:
        raise InvalidArgument(
            f"n = {n} is not a goal: give n >= 2 copies, n = 1 to remove the goal, or no n for "
            "a copy on every worker"
        )


class GoalBook:
    """The goals of one AMM; ``mapping`` is the read-only view cycles snapshot."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._goals: dict[Key, Goal] = {}
        self.mapping: Mapping[Key, Goal] = MappingProxyType(self._goals)

    def load(self) -> None:
        """Take back the goals persisted by earlier runs."""
        self._goals.clear()
        self._goals.update((Key(k), n) for k, n in self._store.goals().items())

    def __len__(self) -> int:
        return len(self._goals)

    def __contains__(self, key: object) -> bool:
        return key in self._goals

    def set(self, keys: Sequence[str], n: Goal) -> tuple[int, int]:
        """Set the goal of ``keys`` to ``n`` (1 removes it); returns (goals set or changed,
        goals removed). Keys must have been checked to exist by the caller."""
        check_goal(n)
        wanted = list(dict.fromkeys(Key(k) for k in keys))
        if n == 1:
            gone = [k for k in wanted if k in self._goals]
            self._store.remove_goals(gone)
            for key in gone:
                del self._goals[key]
            return 0, len(gone)
        changed = [k for k in wanted if k not in self._goals or self._goals[k] != n]
        self._store.set_goals(changed, n)
        for key in changed:
            self._goals[key] = n
        return len(changed), 0

    def remove(self, keys: Iterable[str]) -> int:
        """Remove the goals of ``keys`` (those without one are ignored); returns how many."""
        gone = [Key(k) for k in dict.fromkeys(keys) if k in self._goals]
        self._store.remove_goals(gone)
        for key in gone:
            del self._goals[key]
        return len(gone)

    def statuses(self, keys: Sequence[str], state: ClusterState) -> list[GoalStatus]:
        """Each goal of ``keys`` as it stands in ``state`` (every goal when empty), by key;
        NotFound lists the keys that have none."""
        if keys:
            wanted = list(dict.fromkeys(Key(k) for k in keys))
            missing = [k for k in wanted if k not in self._goals]
            if missing:
                raise NotFound(f"no replication goal for key(s): {listing(missing)}")
        else:
            wanted = list(self._goals)
        counter = _counter(state)
        found = state.keys
        return sorted(
            (counter.status(k, self._goals[k], found.get(k)) for k in wanted),
            key=lambda s: s.key,
        )

    def totals(self, state: ClusterState) -> tuple[int, int]:
        """(keys with a goal, keys below their goal) in ``state``."""
        if not self._goals:
            return 0, 0
        counter = _counter(state)
        found = state.keys
        below = sum(1 for k, n in self._goals.items() if counter.status(k, n, found.get(k)).below)
        return len(self._goals), below


def _counter(state: ClusterState) -> GoalCounter:
    return GoalCounter({w.address: w for w in state.workers})
