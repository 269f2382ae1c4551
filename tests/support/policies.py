"""The custom policy of the README, verbatim, so that the documented example is tested."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from amm_service.decisions.view import ClusterView, Measure
from amm_service.policies import PendingView, PolicyRun, drop, replicate
from amm_service.policies.reduce_replicas import ReduceReplicas


class KeepTwo:
    """Keep at most `copies` replicas of every key."""

    def __init__(self, *, copies: int = 2, name: str = "KeepTwo") -> None:
        if copies < 1:
            raise ValueError("copies must be at least 1")
        self.copies = copies
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        for key in view.replicated:  # keys held by 2+ workers
            holders = view.keys[key].holders
            excess = len(holders) - self.copies - len(pending.in_flight(key).dropping)
            for _ in range(excess):
                chosen = yield drop(key)  # the core picks the worker, or None
                if chosen is None:
                    break


class DropEverything:
    """A hostile policy: asks to drop every replica of every key, twice over."""

    def __init__(self, *, name: str = "DropEverything") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        for key, kv in view.keys.items():
            for _ in range(2 * len(kv.holders)):
                yield drop(key)


class TopUp:
    """A stand-in for a replication goal: at least `copies` replicas of every key, each
    suggestion with its reason; runs before clean-up, as repairs do."""

    priority = 10

    def __init__(
        self, *, copies: int = 2, keys: list[str] | None = None, name: str = "TopUp"
    ) -> None:
        self.copies = copies
        self.keys = keys
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        for key in sorted(view.keys):
            if self.keys is not None and key not in self.keys:
                continue
            have = len(view.keys[key].holders) + len(pending.in_flight(key).replicating)
            for _ in range(self.copies - have):
                reason = f"{have} of {self.copies} copies"
                if (yield replicate(key, reason=reason)) is None:
                    break


class CutShortOnce:
    """Raises CancelledError from its first run, as an awaited call does when its channel is
    closed under it (a retired agent unregistering while the AMM awaits its Close answer)."""

    runs = 0

    def __init__(self, *, name: str = "CutShortOnce") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        CutShortOnce.runs += 1
        if CutShortOnce.runs == 1:
            raise asyncio.CancelledError
        yield from ()


class Watched(ReduceReplicas):
    """ReduceReplicas that calls ``probe`` (set by a test) at its first and last suggestion,
    and counts the suggestions it made (``made``), so a test can see what the event loop and
    the agents did while a cycle planned."""

    def __init__(self, *, name: str = "Watched") -> None:
        super().__init__(name=name)
        self.probe: Callable[[str], None] = lambda moment: None
        self.made = 0

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        inner = super().run(view, pending, measure)
        self.made = 0
        try:
            suggestion = next(inner)
            self.probe("first suggestion")
            while True:
                if suggestion is not None:
                    self.made += 1
                suggestion = inner.send((yield suggestion))
        except StopIteration:
            pass
        self.probe("done")
