"""Which address an agent advertises (``worker_agent.advertise``): as given, ``auto``, or the
bound address with a wildcard host replaced. ``auto`` only asks the kernel for a route: no packet
leaves, so these tests need no server."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from worker_agent.__main__ import build_parser, config_from_args
from worker_agent.advertise import advertised_address, local_ip
from worker_agent.config import AgentConfig


def test_an_explicit_address_is_used_as_given() -> None:
    assert advertised_address("0.0.0.0:7000", "w1.example:7001", "127.0.0.1:50051") == (
        "w1.example:7001"
    )


def test_without_advertise_a_wildcard_host_becomes_the_host_name() -> None:
    assert advertised_address("0.0.0.0:7000", None, None) == f"{socket.gethostname()}:7000"
    assert advertised_address("127.0.0.1:7000", None, None) == "127.0.0.1:7000"


def test_auto_takes_the_ip_on_the_route_to_the_amm_and_the_bound_port() -> None:
    assert advertised_address("0.0.0.0:7000", "auto", "127.0.0.1:50051") == "127.0.0.1:7000"
    assert advertised_address("0.0.0.0:7000", "auto", "localhost:50051") in {
        "127.0.0.1:7000",
        "[::1]:7000",
    }


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.connect(("::1", 9))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_auto_brackets_an_ipv6_address() -> None:
    assert advertised_address("[::]:7000", "auto", "[::1]:50051") == "[::1]:7000"


def test_auto_without_an_amm_takes_the_ip_the_host_name_resolves_to() -> None:
    ip = local_ip(None)
    assert ip == socket.gethostbyname(socket.gethostname())
    ipaddress.ip_address(ip)  # an IP address, not a name
    assert advertised_address("0.0.0.0:7000", "auto", None) == f"{ip}:7000"


def test_auto_is_accepted_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMM_AGENT_ADVERTISE", "auto")
    config = config_from_args(build_parser().parse_args(["--listen", "0.0.0.0:50061"]))
    assert config.advertise == "auto"


@pytest.mark.parametrize("value", ["automatic", "nowhere", "auto:"])
def test_anything_else_must_be_host_and_port(value: str) -> None:
    with pytest.raises(ValueError, match="advertise must be HOST:PORT"):
        AgentConfig(advertise=value)
