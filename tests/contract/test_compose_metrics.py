"""docker-compose.yml serves Prometheus metrics from every server, as the README says."""

from __future__ import annotations

import pytest

from tests.contract.test_compose_file import DOCKERFILE, service


@pytest.mark.parametrize(
    ("name", "variable", "port"),
    [("amm", "AMM_METRICS_LISTEN", "9051"), ("worker", "AMM_AGENT_METRICS_LISTEN", "9061")],
)
def test_every_server_serves_metrics_on_every_interface(
    name: str, variable: str, port: str
) -> None:
    assert service(name)["environment"][variable] == f"0.0.0.0:{port}"
    assert port in DOCKERFILE.read_text().split("EXPOSE", 1)[1].splitlines()[0].split()
