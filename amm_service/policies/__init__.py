"""Policies: pluggable sources of suggestions, run once per cycle over a frozen cluster view."""

from amm_service.policies.base import (
    DEFAULT_PRIORITY,
    PendingView,
    Policy,
    PolicyRun,
    RetireRequest,
    Suggestion,
    drop,
    priority_of,
    replicate,
)
from amm_service.policies.registry import BUILTINS, PolicyError, build_all

__all__ = [
    "BUILTINS",
    "DEFAULT_PRIORITY",
    "PendingView",
    "Policy",
    "PolicyError",
    "PolicyRun",
    "RetireRequest",
    "Suggestion",
    "build_all",
    "drop",
    "priority_of",
    "replicate",
]
