"""The policy interface: what a policy sees and what it may say.

A policy looks at a frozen ``ClusterView`` and yields ``Suggestion``s; it never sends, awaits or
mutates anything. The core answers each suggestion by sending back the worker it chose, or None
when it rejected it, so a policy can adapt (``ws = yield Suggestion(...)``, as in Dask). The core
alone decides, and it alone enforces that no key loses its last replica.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple, Protocol, runtime_checkable

from amm_service.directive import Op
from amm_service.pending import InFlight
from amm_service.view import ClusterView, Key, Measure, WorkerId


class Suggestion(NamedTuple):
    """Replicate or drop ``key``; ``candidates`` limits where (None: anywhere, empty: nowhere)."""

    op: Op
    key: Key
    candidates: frozenset[WorkerId] | None = None


PolicyRun = Generator[Suggestion, WorkerId | None, None]


class PendingView(Protocol):
    """What is under way for a key: in flight from earlier cycles plus this cycle's picks."""

    def in_flight(self, key: Key) -> InFlight: ...


@runtime_checkable
class Policy(Protocol):
    """A source of suggestions. ``name`` identifies the instance in reports and logs."""

    name: str

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun: ...


def replicate(key: Key, candidates: frozenset[WorkerId] | None = None) -> Suggestion:
    return Suggestion(Op.REPLICATE, key, candidates)


def drop(key: Key, candidates: frozenset[WorkerId] | None = None) -> Suggestion:
    return Suggestion(Op.DROP, key, candidates)
