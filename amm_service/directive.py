"""What the AMM asks an agent to do: the Directive value shared by the core, the ledger and the
dispatcher. The wire form is ``amm.v1.Directive``; conversion lives at the gRPC edge."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from amm_service.view import Key, WorkerId


class Op(enum.Enum):
    """Replicate a key onto a worker, or drop it from one."""

    REPLICATE = "replicate"
    DROP = "drop"


class OutcomeStatus(enum.Enum):
    """How an agent answered a directive."""

    APPLIED = "applied"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Directive:
    """One order for one worker.

    ``sources`` (replicate) are holders to fetch from; ``holders`` (drop) are the other holders, one
    of which must promise to keep the key before the agent drops its own replica.
    """

    id: str
    epoch: int
    op: Op
    key: Key
    worker: WorkerId
    size: int
    checksum: str
    sources: tuple[WorkerId, ...] = ()
    holders: tuple[WorkerId, ...] = ()
    policy: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """An agent's answer to a directive (reason is the wire enum's name, e.g. ``PINNED``)."""

    directive_id: str
    status: OutcomeStatus
    reason: str = ""
    message: str = ""
    inventory_version: int = 0
    duplicate: bool = False
