"""A third-party policy given by dotted path with kwargs, as the README documents it."""

from __future__ import annotations

import pytest

from amm_service.decisions.core import PlanConfig, plan
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import Key
from amm_service.policies import PolicyError, build_all
from tests.factories import new_ids, view


def test_the_readme_policy_loads_by_dotted_path_and_keeps_two_copies() -> None:
    (policy,) = build_all([("tests.support.policies.KeepTwo", {"copies": 2})])
    v = view({"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]})
    result = plan(v, [policy], Ledger(), PlanConfig("managed", 1), new_ids())
    assert len(result.directives) == 2
    assert all(d.key == Key("x") and d.policy == "KeepTwo" for d in result.directives)


def test_two_instances_with_different_kwargs_run_side_by_side() -> None:
    keep3, keep1 = build_all(
        [
            ("tests.support.policies.KeepTwo", {"copies": 3}),
            ("tests.support.policies.KeepTwo", {"copies": 1}),
        ]
    )
    assert (keep3.name, keep1.name) == ("KeepTwo", "KeepTwo#2")
    v = view({"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]})
    result = plan(v, [keep3, keep1], Ledger(), PlanConfig("managed", 1), new_ids())
    assert [d.policy for d in result.directives] == ["KeepTwo", "KeepTwo#2", "KeepTwo#2"]


def test_invalid_kwargs_are_refused_with_the_policys_own_message() -> None:
    with pytest.raises(PolicyError, match="copies must be at least 1"):
        build_all([("tests.support.policies.KeepTwo", {"copies": 0})])
