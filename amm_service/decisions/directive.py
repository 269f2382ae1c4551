"""What the AMM asks an agent to do: the Directive value shared by the core, the ledger and the
dispatcher. The wire form is ``amm.v1.Directive``; conversion lives at the gRPC edge."""

from __future__ import annotations

import enum
from typing import NamedTuple

from amm_service.decisions.view import Key, WorkerId


class Op(enum.Enum):
    """Replicate a key onto a worker, or drop it from one."""

    REPLICATE = "replicate"
    DROP = "drop"


class OutcomeStatus(enum.Enum):
    """How an agent answered a directive."""

    APPLIED = "applied"
    REFUSED = "refused"
    FAILED = "failed"


class Directive(NamedTuple):
    """One order for one worker.

    ``sources`` (replicate) are holders to fetch from; ``holders`` (drop) are the other holders, one
    of which must promise to keep the key before the agent drops its own replica.

    A NamedTuple, not a frozen dataclass: a cycle may create hundreds of thousands, and a tuple is
    built several times faster; it is as immutable.
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


class Outcome(NamedTuple):
    """An agent's answer to a directive (reason is the wire enum's name, e.g. ``PINNED``); a
    NamedTuple, as a big cycle gets hundreds of thousands back."""

    directive_id: str
    status: OutcomeStatus
    reason: str = ""
    message: str = ""
    inventory_version: int = 0
    duplicate: bool = False
    dropped_version: int = 0
    """An applied DROP: an inventory version at which the key was gone, read with the drop
    (``DirectiveOutcome.dropped_version``); 0 when the agent did not say."""
    incarnation: str = ""
    """The agent process that answered (``DirectivesResponse.incarnation``); empty when the
    agent did not say: ``dropped_version`` is then not used."""
