"""Identities: the URI SAN format, name rules, and who may register as which worker."""

from __future__ import annotations

import pytest

from amm.base.security import Identity, Role, SecurityError, may_act_as, parse_uri
from amm.base.security.identity import check_name


def test_uri_round_trip() -> None:
    w7 = Identity(Role.AGENT, "w7")
    assert w7.uri == "spiffe://amm/agent/w7"
    assert parse_uri(w7.uri) == w7
    assert w7.server_name == "w7.agent.amm"
    assert str(w7) == "agent 'w7'"


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://other/agent/w7",  # another trust domain
        "spiffe://amm/root/w7",  # no such role
        "spiffe://amm/agent",  # no name
        "spiffe://amm/agent/W7",  # not a DNS label
        "spiffe://amm/agent/w7/x",
        "spiffe://amm/agent/ca",  # reserved
        "https://amm/agent/w7",
    ],
)
def test_uris_that_are_not_amm_identities(uri: str) -> None:
    assert parse_uri(uri) is None


@pytest.mark.parametrize("name", ["w7", "a", "worker-12", "0", "x" * 63])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "W7", "-w", "w-", "w_7", "w.7", "x" * 64, "a b", "ca"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(SecurityError):
        check_name(name)


def test_unknown_role_lists_the_roles() -> None:
    with pytest.raises(SecurityError, match="expected one of reader, operator, agent, amm"):
        Role.parse("admin")


def test_serving_roles() -> None:
    assert {r for r in Role if r.serves} == {Role.AMM, Role.AGENT}


def test_an_agent_acts_only_as_itself_unless_it_holds_the_shared_identity() -> None:
    w7 = Identity(Role.AGENT, "w7")
    assert may_act_as(w7, "w7")
    assert not may_act_as(w7, "w8")
    assert may_act_as(Identity(Role.AGENT, "agent"), "w8")
    assert not may_act_as(Identity(Role.OPERATOR, "w7"), "w7")
    assert not may_act_as(Identity(Role.AMM, "agent"), "w8")
