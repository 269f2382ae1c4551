"""Records of what AMM cycles did, for RunOnce, GetStatus and logs.

A cycle's record is filled in as its directives' outcomes arrive, which may be after the cycle
ended; only the most recent cycles keep their records. A cycle may send hundreds of thousands of
directives, so a record counts their outcomes and keeps each one in detail only for the first
``MAX_DIRECTIVES_REPORTED`` (what a report lists).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from amm.base.tally import Durations
from amm_service.decisions.core import Plan, Rejection
from amm_service.decisions.directive import Directive, Outcome, OutcomeStatus
from amm_service.decisions.view import WorkerId

MAX_REJECTIONS_REPORTED = 100
#: Directives a record keeps in detail (with their outcomes), and a report lists.
MAX_DIRECTIVES_REPORTED = 1_000
_DIRECTIVE_ID = itemgetter(0)
"""An outcome's ``directive_id`` (its first field), read through ``map``."""


@dataclass(slots=True)
class DirectiveRecord:
    """A directive sent (or, in a dry run, that would have been), and its outcome once known."""

    directive: Directive
    sent_at: float
    outcome: Outcome | None = None
    timed_out: bool = False


@dataclass(slots=True)
class CycleRecord:
    """One cycle: timing, counts, directives with outcomes, rejections."""

    number: int
    started_at: float
    duration: float = 0.0
    plan_duration: float = 0.0
    poll_duration: float = 0.0
    """Polling every agent (and sending overdue directives again first)."""
    send_duration: float = 0.0
    """Sending directives, including what was sent while the rest was planned."""
    suggestions: int = 0
    rejected: int = 0
    rejections: tuple[Rejection, ...] = ()
    policy_errors: tuple[str, ...] = ()
    unreachable: tuple[WorkerId, ...] = ()
    directives: dict[str, DirectiveRecord] = field(default_factory=dict)
    """The first ``MAX_DIRECTIVES_REPORTED`` directives, by id."""
    planned_count: int = 0
    """How many directives the plan made (sent, unless a dry run)."""
    dry_run: bool = False
    """Planned only: ``directives`` lists what would have been sent; nothing was."""
    startup_grace: bool = False
    """Drops were held back: the AMM was in its start-up grace."""
    applied: int = 0
    refused: int = 0
    failed: int = 0
    timed_out: int = 0
    """Directives that will get no outcome (expired, or their worker left)."""
    not_applied: Counter[str] = field(default_factory=Counter)
    """Refused or failed outcomes by (lowercase) reason, for the cycle's ``directives-refused``
    event."""
    refusers: set[WorkerId] = field(default_factory=set)
    """The workers that refused or failed any of this cycle's directives."""
    refused_keys: list[str] = field(default_factory=list)
    """The first keys refused or failed (as many as an event lists)."""
    all_sent: bool = False
    """The cycle has sent all its directives: once they are all settled, its outcomes are
    final."""
    refusals_reported: bool = False
    _settled: asyncio.Event | None = None

    def planned(self, plan: Plan) -> None:
        """What the plan decided besides its directives (``sending`` records those)."""
        self.suggestions = plan.suggestions
        self.rejected = len(plan.rejections)
        self.rejections = plan.rejections[:MAX_REJECTIONS_REPORTED]
        self.policy_errors = plan.policy_errors

    def sending(self, directives: Sequence[Directive], sent_at: float) -> None:
        """Directives of this cycle sent (or, in a dry run, that would be), in order; may be
        called several times, as a big cycle sends while it plans."""
        room = MAX_DIRECTIVES_REPORTED - len(self.directives)
        for d in directives[: max(0, room)]:
            self.directives[d.id] = DirectiveRecord(d, sent_at)
        self.planned_count += len(directives)

    @property
    def unsettled(self) -> int:
        """Directives sent that have neither an outcome nor been given up on."""
        if self.dry_run:
            return 0
        done = self.applied + self.refused + self.failed + self.timed_out
        return max(0, self.planned_count - done)

    def count(self, status: OutcomeStatus) -> int:
        if status is OutcomeStatus.APPLIED:
            return self.applied
        if status is OutcomeStatus.REFUSED:
            return self.refused
        return self.failed

    def settle(self, outcome: Outcome) -> None:
        """An outcome for one of this cycle's directives."""
        if outcome.status is OutcomeStatus.APPLIED:
            self.applied += 1
        elif outcome.status is OutcomeStatus.REFUSED:
            self.refused += 1
        else:
            self.failed += 1
        rec = self.directives.get(outcome.directive_id)
        if rec is not None:
            rec.outcome = outcome
        self._check_settled()

    def settle_applied(self, outcomes: Sequence[Outcome]) -> None:
        """Applied outcomes for this cycle's directives, all at once (``settle`` of each, for
        the hundreds of thousands of a big cycle)."""
        self.applied += len(outcomes)
        kept = self.directives
        if kept:
            # Only the first ``MAX_DIRECTIVES_REPORTED`` are kept: find them in C, not with a
            # look-up per outcome (each of a big cycle's 300,000).
            answered = dict(zip(map(_DIRECTIVE_ID, outcomes), outcomes, strict=True))
            for directive_id in answered.keys() & kept.keys():
                kept[directive_id].outcome = answered[directive_id]
        self._check_settled()

    def give_up(self, directive_id: str) -> None:
        """One of this cycle's directives will get no outcome."""
        self.timed_out += 1
        rec = self.directives.get(directive_id)
        if rec is not None and rec.outcome is None:
            rec.timed_out = True
        self._check_settled()

    async def wait_settled(self, limit: float) -> None:
        """Until every directive has an outcome or was given up on, or ``limit`` seconds."""
        if self.unsettled == 0:
            return
        if self._settled is None:
            self._settled = asyncio.Event()
        try:
            async with asyncio.timeout(limit):
                await self._settled.wait()
        except TimeoutError:
            pass

    def release(self) -> None:
        """Stop anyone waiting (the AMM is shutting down)."""
        if self._settled is not None:
            self._settled.set()

    def _check_settled(self) -> None:
        if self._settled is not None and self.unsettled == 0:
            self._settled.set()


class CycleStats:
    """Every cycle's duration and its phases' (poll, plan, send), its suggestions and rejections,
    summed since the AMM started: one observation per phase per cycle, for the metrics."""

    __slots__ = ("duration", "phases", "rejected", "suggestions")

    def __init__(self) -> None:
        self.duration = Durations()
        self.phases = {"poll": Durations(), "plan": Durations(), "send": Durations()}
        self.suggestions = 0
        self.rejected = 0

    def observe(self, record: CycleRecord) -> None:
        self.duration.observe(record.duration)
        self.phases["poll"].observe(record.poll_duration)
        self.phases["plan"].observe(record.plan_duration)
        self.phases["send"].observe(record.send_duration)
        self.suggestions += record.suggestions
        self.rejected += record.rejected
