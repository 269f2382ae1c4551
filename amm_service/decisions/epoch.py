"""The AMM's epoch: the fencing token on every directive, and when it may move.

Agents refuse directives from an epoch older than the newest they have confirmed with the AMM
they are configured with (and, since they confirm only with it, from a newer one it did not
issue), so of two AMMs managing the same workers only the most recently started one at that
address acts. The rules:

1. each start begins a new epoch (persisted), so a restarted AMM fences off its previous run; a
   fresh state's first epoch, and each step, is random (``state.StateStore.begin_epoch``), so
   two fresh AMMs, or two started from copies of one state file, do not share one;
2. a fresh AMM (new, or with a reset state file) whose own agents (restored at start-up, or
   registering) have seen a newer epoch moves past it, but only before it has sent anything;
3. epochs merely seen in polls never move ours: an AMM polling agents registered with another
   one is fenced, says so once and stops cycling (``check_fenced``);
4. epochs are bounded (``amm.base.validation``): we move past one only up to
   ``MAX_ADOPTED_EPOCH``, so whatever a registration claims, 2^32 starts remain before
   ``MAX_EPOCH``. Agents registered with us adopt a newer epoch only once we confirm it, so no
   epoch we did not issue fences us off.

Directive ids carry the epoch they were issued under and a token of the AMM's run, so ids never
collide between AMMs. Pure: the store and the poller are ports.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from typing import Protocol

from amm.base.validation import MAX_ADOPTED_EPOCH

log = logging.getLogger(__name__)


class EpochStore(Protocol):
    """Where the epoch persists (``state.StateStore``)."""

    def begin_epoch(self) -> int: ...

    def raise_epoch(self, above: int) -> int: ...


class EpochCarrier(Protocol):
    """What tells agents our epoch and hears theirs (``poller.Poller``)."""

    epoch: int

    @property
    def newest_agent_epoch(self) -> int: ...


class EpochFence:
    """This AMM's epoch and the ids of the directives issued under it."""

    def __init__(self, store: EpochStore, poller: EpochCarrier) -> None:
        self._store = store
        self._poller = poller
        self.epoch = 0
        self._ids = itertools.count(1)
        #: Unique to this run of the AMM: two AMMs that did share an epoch still issue distinct
        #: directive ids, which agents deduplicate by.
        self._run = secrets.token_hex(4)
        self._prefix, self._prefix_epoch = f"e0.{self._run}.", 0
        """Of every id: ``e<epoch>.<run>.`` (for ``_prefix_epoch``), then a number."""
        self._acted = False
        #: The newer epoch that fenced this AMM off; 0 while it is not.
        self.fenced_by = 0

    def begin(self) -> None:
        """Begin a new epoch: called once at each start."""
        self._set_epoch(self._store.begin_epoch())

    def acted(self, sent: bool) -> None:
        """Note whether a cycle sent directives: once one has, the epoch never moves again."""
        self._acted = self._acted or sent

    def new_id(self) -> str:
        if self._prefix_epoch != self.epoch:
            self._prefix, self._prefix_epoch = f"e{self.epoch}.{self._run}.", self.epoch
        return self._prefix + str(next(self._ids))

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._poller.epoch = epoch

    def adopt_newer(self, seen: int) -> None:
        """Move past an epoch our own agents have seen, as long as we have not acted yet.

        Called with what the agents we restored at start-up, or that register with us, report.
        A fresh AMM (new, or with a reset state file) whose agents saw a newer epoch would
        otherwise have every directive refused forever. Before it has sent anything, moving
        past that epoch is safe: the most recently started AMM is the one in charge. Epochs
        merely seen in polls never move ours: an AMM that is polling agents registered with
        another one must stay fenced.
        """
        if seen <= self.epoch or self._acted:
            return
        if seen > MAX_ADOPTED_EPOCH:  # no AMM issued it: callers refuse it, we ignore it
            log.warning("ignoring AMM epoch %d reported by an agent: beyond any issued", seen)
            return
        self._set_epoch(self._store.raise_epoch(seen))
        log.warning("agents had seen AMM epoch %d: this AMM now runs as epoch %d", seen, self.epoch)

    def check_fenced(self) -> int | None:
        """The newer epoch agents report, the first time they do: another AMM took over (its
        agents confirm epochs only with the AMM they are configured with), so this one stops
        for good; ``fenced_by`` keeps it. None otherwise."""
        seen = self._poller.newest_agent_epoch
        if seen <= self.epoch or self.fenced_by:
            return None
        self.fenced_by = seen
        log.warning(
            "agents have seen AMM epoch %d, newer than ours (%d): another AMM is in charge, "
            "agents refuse our directives, and this AMM stops cycling",
            seen,
            self.epoch,
        )
        return seen
