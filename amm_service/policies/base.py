"""The policy interface: what a policy sees and what it may say.

A policy looks at a frozen ``ClusterView`` and yields ``Suggestion``s; it never sends, awaits or
mutates anything. The core answers each suggestion by sending back the worker it chose, or None
when it rejected it, so a policy can adapt (``ws = yield Suggestion(...)``, as in Dask). The core
alone decides, and it alone enforces that no key loses its last replica.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Container, Generator, Iterable, Set
from typing import NamedTuple, Protocol, runtime_checkable

from amm_service.decisions.directive import Op
from amm_service.decisions.pending import InFlight
from amm_service.decisions.view import ClusterView, Key, Measure, WorkerId


class Suggestion(NamedTuple):
    """Replicate or drop ``key``; ``candidates`` limits where (None: anywhere, empty: nowhere).
    ``reason`` travels with the directive into reports, dry runs and logs.

    ``copies`` asks for that many copies made or dropped at once, on different workers. The core
    decides it exactly as ``copies`` suggestions of one in a row (each counts against the
    runaway limit), only cheaper. It answers with the worker of the last one when all were made,
    None when any was rejected: it stops at the first rejection and records it once for each
    copy not made (nothing changed, so asking again would be rejected the same way).
    ``pending.in_flight(key)`` shows which workers were picked. Fewer than 1 is a policy
    error."""

    op: Op
    key: Key
    candidates: frozenset[WorkerId] | None = None
    reason: str = ""
    copies: int = 1


class RetireRequest(NamedTuple):
    """Ask the AMM to retire ``worker`` gracefully (PauseToRetire does). The core accepts it
    unless the worker is the last one taking replicas or the others have no room for its data;
    the core answers with the worker when accepted, None when declined."""

    worker: WorkerId
    reason: str
    close: bool = True


PolicyRun = Generator[Suggestion | RetireRequest | None, WorkerId | None, None]
"""What ``Policy.run`` returns. A policy that looks at many keys between two suggestions may
yield None now and then (ReduceReplicas does, every ``SCAN_STEP`` keys): the core answers None
and may let the AMM's event loop run before it goes on, so that a long scan does not hold up
control calls. None counts as no suggestion."""
#: Keys a policy looks at between two of its ``None`` pauses (see ``PolicyRun``): about 1 ms of
#: ReduceReplicas' scan. With 1,024, the core's steps held the AMM's loop for 30-95 ms of CPU
#: each during a 100k-key cycle on a busy machine (``loop_probe``).
SCAN_STEP = 128
#: Keys sorted in one slice by ``sorted_in_steps`` (between two ``None`` pauses).
SORT_STEP = 2_048

DEFAULT_PRIORITY = 50
"""Policies run in ascending ``priority`` (config order among equals); throttled transfer slots go
to those that run first, so repairs (Replicate: 10, RetireWorker: 20) come before clean-up
(ReduceReplicas: 50) and balancing (Rebalance: 90). A policy without the attribute gets 50."""


class PendingView(Protocol):
    """What is under way for a key: in flight from earlier cycles plus this cycle's picks."""

    def in_flight(self, key: Key) -> InFlight: ...


@runtime_checkable
class TrackedPending(PendingView, Protocol):
    """A ``PendingView`` that also tells what changed, for a policy that re-plans only the keys
    that did (the core's is one, over the ledger; see ``pending.Ledger.journal``)."""

    @property
    def feed(self) -> tuple[int, int] | None:
        """Where the ledger's journal is now, for ``changed_since`` next cycle; None when the
        work in flight is not journaled (then every key must be looked at)."""

    def changed_since(self, uid: int, position: int) -> set[Key] | None:
        """The keys whose work in flight may ask more than it did since ``feed`` gave
        ``(uid, position)``: an entry left the ledger or a replication was added (a drop added
        only lessens what is left to do). None: not known."""

    def noted_since(self, uid: int, position: int) -> list[Key] | None:
        """``changed_since`` as the ledger's journal noted it, in order and with repeats: cheap
        to get, for a policy that makes a set of it in steps."""

    def count(self, key: Key) -> int:
        """How many directives of ``key`` the ledger holds (those of this cycle once sent)."""

    def picked(self) -> Set[Key]:
        """The keys this cycle's earlier suggestions picked workers for, so far."""


@runtime_checkable
class Policy(Protocol):
    """A source of suggestions. ``name`` identifies the instance in reports and logs."""

    name: str

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun: ...


def sorted_in_steps(
    keys: Iterable[Key], within: Container[Key] | None = None
) -> Generator[None, None, list[Key]]:
    """``sorted(keys)`` (only those in ``within``, when given) with ``None`` pauses in between
    (``keys = yield from ...`` in a policy's run): sorting 100k keys in one go held the AMM's
    event loop for 25-70 ms. ``keys`` are read and filtered ``SORT_STEP`` at a time and each
    slice sorted, then the runs merged two at a time, each merge in pieces of about
    ``SORT_STEP`` keys of each run (``_merged_in_steps``); timsort merges two sorted runs in
    about one comparison per key, so the whole costs about what one sort does. Read lazily, so
    that a caller need not make the set of keys whole first (``(todo | others) & replicated`` of
    100k keys, with the list of them, held the loop for 23 ms of CPU: ``loop_probe``)."""
    source = iter(keys)
    runs: list[list[Key]] = []
    while True:
        piece = list(itertools.islice(source, SORT_STEP))
        full = len(piece) == SORT_STEP
        if within is not None:
            piece = [k for k in piece if k in within]
        if not runs and not full:
            return sorted(piece)  # a few keys: at once, no pause
        if piece:
            runs.append(sorted(piece))
        yield None
        if not full:
            break
    while len(runs) > 1:
        merged: list[list[Key]] = []
        for first in range(0, len(runs), 2):
            pair = runs[first : first + 2]
            if len(pair) == 2:
                merged.append((yield from _merged_in_steps(pair[0], pair[1])))
            else:
                merged.append(pair[0])
        runs = merged
    return runs[0] if runs else []


def _merged_in_steps(a: list[Key], b: list[Key]) -> Generator[None, None, list[Key]]:
    """Two sorted runs merged, ``None`` after each piece: a piece takes the keys of both up to
    the smaller of the ``SORT_STEP``-th keys ahead in each, so at most ``SORT_STEP`` of each.
    Merged whole, the last merge of a 100k-key sort held the AMM's loop for 23 ms of CPU
    (``loop_probe``, a 100k-key cycle)."""
    out: list[Key] = []
    i = j = 0
    while i < len(a) and j < len(b):
        bound = min(a[min(i + SORT_STEP, len(a)) - 1], b[min(j + SORT_STEP, len(b)) - 1])
        i_end, j_end = bisect.bisect_right(a, bound, i), bisect.bisect_right(b, bound, j)
        out += sorted(a[i:i_end] + b[j:j_end])
        i, j = i_end, j_end
        yield None
    out += a[i:]
    out += b[j:]
    return out


#: The members read once (``Op.DROP`` is a lookup through ``EnumType``, ten times a plain class
#: attribute on Python 3.11): a big cycle suggests 100,000 drops.
_DROP, _REPLICATE = Op.DROP, Op.REPLICATE


def replicate(
    key: Key, candidates: frozenset[WorkerId] | None = None, reason: str = "", copies: int = 1
) -> Suggestion:
    return Suggestion(_REPLICATE, key, candidates, reason, copies)


def drop(
    key: Key, candidates: frozenset[WorkerId] | None = None, reason: str = "", copies: int = 1
) -> Suggestion:
    return Suggestion(_DROP, key, candidates, reason, copies)


def priority_of(policy: Policy) -> int:
    value = getattr(policy, "priority", DEFAULT_PRIORITY)
    return value if isinstance(value, int) else DEFAULT_PRIORITY
