"""Records of what AMM cycles did, for RunOnce, GetStatus and logs.

A cycle's record is filled in as its directives' outcomes arrive, which may be after the cycle
ended; only the most recent cycles keep their records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amm_service.core import Plan, Rejection
from amm_service.directive import Directive, Outcome, OutcomeStatus
from amm_service.view import WorkerId

MAX_REJECTIONS_REPORTED = 100


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
    suggestions: int = 0
    rejected: int = 0
    rejections: tuple[Rejection, ...] = ()
    policy_errors: tuple[str, ...] = ()
    unreachable: tuple[WorkerId, ...] = ()
    directives: dict[str, DirectiveRecord] = field(default_factory=dict)
    dry_run: bool = False
    """Planned only: ``directives`` lists what would have been sent; nothing was."""
    startup_grace: bool = False
    """Drops were held back: the AMM was in its start-up grace."""

    def planned(self, plan: Plan, sent_at: float) -> None:
        self.suggestions = plan.suggestions
        self.rejected = len(plan.rejections)
        self.rejections = plan.rejections[:MAX_REJECTIONS_REPORTED]
        self.policy_errors = plan.policy_errors
        self.directives = {d.id: DirectiveRecord(d, sent_at) for d in plan.directives}

    def count(self, status: OutcomeStatus) -> int:
        return sum(
            1
            for r in self.directives.values()
            if r.outcome is not None and r.outcome.status is status
        )
