"""``Records``: what the AMM knows and keeps, as one collaborator for the parts that read and
write it (the cycles, the worker registry, the queries), rather than ten arguments each."""

from __future__ import annotations

from dataclasses import dataclass

from amm_service.decisions.events import EventLog
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState
from amm_service.runtime.records.goals import GoalBook
from amm_service.runtime.records.lost import Losses, LostBook
from amm_service.runtime.records.outcomes import Outcomes
from amm_service.runtime.records.state import StateStore
from amm_service.runtime.records.storing import Storing
from amm_service.runtime.records.tombstones import TombstoneBook


@dataclass(frozen=True, slots=True)
class Records:
    """The AMM's records, one of each: built once by the manager and shared by reference."""

    #: What every worker holds and reports, as the polls merge it.
    state: ClusterState
    #: The directives in flight.
    ledger: Ledger
    #: What happened, for operators and watchers.
    events: EventLog
    #: The SQLite state the books below persist in.
    store: StateStore
    #: What became of sent directives.
    outcomes: Outcomes
    #: The replication goals.
    goals: GoalBook
    #: Forgotten keys, kept from coming back.
    tombstones: TombstoneBook
    #: Keys agents are storing for a Put that no poll listed yet.
    storing: Storing
    #: The lost keys.
    lost: LostBook
    #: What finds and reports lost keys, into ``lost``.
    losses: Losses
