"""amm: a standalone Active Memory Manager for clusters of workers that hold keyed data in memory.

``from amm import Client`` is what users import (``LocalCluster`` starts a cluster on this
machine); ``amm.v1`` is the generated wire contract and ``amm.base`` the helpers that the client,
the service and the agent share. The names below load on first use, so that the service and the
agent, which import ``amm.v1`` and ``amm.base``, never load the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amm.base.security import Security
    from amm.client import AsyncClient, Client
    from amm.cluster import ClusterError, LocalCluster
    from amm.errors import AmmError
    from amm.models import (
        ClusterTotals,
        CycleReport,
        DirectiveRecord,
        Event,
        EventGap,
        GoalChange,
        LostKey,
        PolicyInfo,
        PutManyResult,
        RefusalRecord,
        Rejection,
        ReplicationGoal,
        RetirementResult,
        Status,
        WorkerInfo,
    )

_HOMES = {
    "AmmError": "amm.errors",
    "AsyncClient": "amm.client",
    "Client": "amm.client",
    "ClusterError": "amm.cluster",
    "ClusterTotals": "amm.models",
    "CycleReport": "amm.models",
    "DirectiveRecord": "amm.models",
    "Event": "amm.models",
    "EventGap": "amm.models",
    "GoalChange": "amm.models",
    "LocalCluster": "amm.cluster",
    "LostKey": "amm.models",
    "PolicyInfo": "amm.models",
    "PutManyResult": "amm.models",
    "RefusalRecord": "amm.models",
    "Rejection": "amm.models",
    "ReplicationGoal": "amm.models",
    "RetirementResult": "amm.models",
    "Security": "amm.base.security",
    "Status": "amm.models",
    "WorkerInfo": "amm.models",
}

__all__ = [
    "AmmError",
    "AsyncClient",
    "Client",
    "ClusterError",
    "ClusterTotals",
    "CycleReport",
    "DirectiveRecord",
    "Event",
    "EventGap",
    "GoalChange",
    "LocalCluster",
    "LostKey",
    "PolicyInfo",
    "PutManyResult",
    "RefusalRecord",
    "Rejection",
    "ReplicationGoal",
    "RetirementResult",
    "Security",
    "Status",
    "WorkerInfo",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'amm' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
