"""amm: a standalone Active Memory Manager for clusters of workers that hold keyed data in memory.

``from amm import Client`` is what users import (``LocalCluster`` starts a cluster on this
machine); ``amm.v1`` is the generated wire contract.
"""

from amm.client import AsyncClient, Client
from amm.cluster import ClusterError, LocalCluster
from amm.errors import AmmError
from amm.models import (
    ClusterTotals,
    CycleReport,
    DirectiveRecord,
    GoalChange,
    PolicyInfo,
    PutManyResult,
    RefusalRecord,
    Rejection,
    ReplicationGoal,
    RetirementResult,
    Status,
    WorkerInfo,
)

__all__ = [
    "AmmError",
    "AsyncClient",
    "Client",
    "ClusterError",
    "ClusterTotals",
    "CycleReport",
    "DirectiveRecord",
    "GoalChange",
    "LocalCluster",
    "PolicyInfo",
    "PutManyResult",
    "RefusalRecord",
    "Rejection",
    "ReplicationGoal",
    "RetirementResult",
    "Status",
    "WorkerInfo",
]
