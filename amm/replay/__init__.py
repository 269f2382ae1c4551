"""Replaying a recorded computation's data movement on an amm cluster.

``trace`` reads and validates a trace; ``plan`` maps it onto agents and keeps the books of which
keys live; ``runner`` replays a plan through the client; ``report`` and ``figure`` show the
results; ``command`` is ``amm replay``.
"""

from amm.replay.plan import EndCheck, Lifetimes, ReplayPlan, Scale, Step, make_plan
from amm.replay.runner import Replayer, ReplayError, ReplayStats
from amm.replay.trace import TaskRecord, Trace, TraceError, load_trace, parse_trace

__all__ = [
    "EndCheck",
    "Lifetimes",
    "ReplayError",
    "ReplayPlan",
    "ReplayStats",
    "Replayer",
    "Scale",
    "Step",
    "TaskRecord",
    "Trace",
    "TraceError",
    "load_trace",
    "make_plan",
    "parse_trace",
]
