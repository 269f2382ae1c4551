"""Policies: pluggable sources of suggestions, run once per cycle over a frozen cluster view."""

from amm_service.policies.base import PendingView, Policy, PolicyRun, Suggestion, drop, replicate
from amm_service.policies.registry import BUILTINS, PolicyError, build_all

__all__ = [
    "BUILTINS",
    "PendingView",
    "Policy",
    "PolicyError",
    "PolicyRun",
    "Suggestion",
    "build_all",
    "drop",
    "replicate",
]
