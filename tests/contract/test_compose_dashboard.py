"""docker-compose.yml serves the AMM's dashboard on a published port, on loopback by default,
over HTTPS for client certificates (the AMM runs with TLS there)."""

from __future__ import annotations

import re

from tests.contract.test_compose_file import DOCKERFILE, default_of, service


def test_the_dashboard_is_published_beside_the_amms_port() -> None:
    amm = service("amm")
    assert amm["environment"]["AMM_DASHBOARD_LISTEN"] == "0.0.0.0:8787"
    assert amm["environment"]["AMM_TLS"] == "/certs", "the dashboard is HTTPS with client certs"
    grpc_port, dashboard = amm["ports"]
    assert grpc_port.endswith(":50051")
    published = re.fullmatch(r"(\$\{[^}]+\}):(\$\{[^}]+\}):(\d+)", dashboard)
    assert published, dashboard
    host, host_port, container_port = published.groups()
    assert (default_of(host), default_of(host_port), container_port) == (
        "127.0.0.1",
        "8787",
        "8787",
    )
    assert "8787" in DOCKERFILE.read_text().split("EXPOSE", 1)[1].splitlines()[0].split()
