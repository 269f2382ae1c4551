"""amm: a standalone Active Memory Manager for clusters of workers that hold keyed data in memory.

``from amm import Client`` is what users import; ``amm.v1`` is the generated wire contract.
"""

from amm.client import AsyncClient, Client
from amm.errors import AmmError
from amm.models import (
    ClusterTotals,
    CycleReport,
    DirectiveRecord,
    PolicyInfo,
    RefusalRecord,
    Rejection,
    Status,
    WorkerInfo,
)

__all__ = [
    "AmmError",
    "AsyncClient",
    "Client",
    "ClusterTotals",
    "CycleReport",
    "DirectiveRecord",
    "PolicyInfo",
    "RefusalRecord",
    "Rejection",
    "Status",
    "WorkerInfo",
]
