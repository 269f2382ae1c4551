"""The docker-compose demo cluster for real: build the image, ``up --scale worker=3``, wait for the
grpc.health.v1 checks, ask the AMM from the host through grpcurl and the Python client with the
operator's certificate the certs service handed out (and fail without it), put a key on each
agent, scale down to 2 (the agent leaving drains: no key lost), stop (every server must exit 0 on
SIGTERM) and tear down. Data calls go to the agents' container IPs: a Linux host reaches them.

It runs only where a Docker engine is reachable and the base image is on it or can be pulled, and
skips with the reason otherwise (see ``tests.support.docker``; ``AMM_COMPOSE_SMOKE=0`` skips it on
purpose). The build needs a package
index or a wheelhouse in ./wheels (``make wheelhouse``); ``BASE_IMAGE`` and ``WHEELHOUSE`` in the
environment reach the build as in any ``docker compose`` call. One test does it all, since the
build dominates its time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from amm import AmmError, Client
from amm.base.security import Security
from tests.support.docker import (
    base_image,
    base_image_unavailable,
    compose_cli,
    engine_unavailable,
)
from tests.support.waiting import poll_until

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
WORKERS = 3
AGENT_PORT = 50061


class Compose:
    """One compose project of docker-compose.yml, under a name of its own."""

    def __init__(self, cli: list[str], project: str, client_certs: Path) -> None:
        self.cli = cli
        self.project = project
        # A host port picked by Docker (no clash with a running cluster), an image tag of the
        # test's own, and a folder of its own for the client certificates (not ./certs).
        self.env = {
            **os.environ,
            "AMM_PORT": "0",
            "AMM_IMAGE": "amm:compose-smoke-test",
            "AMM_CLIENT_CERTS": str(client_certs),
        }

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(
            [*self.cli, "--project-name", self.project, "--file", "docker-compose.yml", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def grpcurl(certs: Path, address: str, method: str) -> Any:
    """grpcurl with the README's flags: the operator's certificate from ``certs``."""
    assert GRPCURL is not None, "grpcurl is installed by the dev extras: make install"
    flags = ["-cacert", str(certs / "ca.pem")]
    flags += ["-cert", str(certs / "operator.pem"), "-key", str(certs / "operator-key.pem")]
    result = subprocess.run(
        [GRPCURL, *flags, "-d", "{}", address, method],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def health(containers: list[str]) -> list[str]:
    out = docker(
        "inspect",
        "--format",
        "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
        *containers,
    )
    return out.split()


@pytest.mark.timeout(1800)
def test_the_compose_cluster_serves_the_host_and_stops_gracefully(tmp_path: Path) -> None:
    reason = engine_unavailable() or base_image_unavailable(base_image(ROOT / "Dockerfile"))
    if reason is not None:
        pytest.skip(reason)
    cli = compose_cli()
    assert cli is not None
    certs = tmp_path / "certs"
    certs.mkdir()
    compose = Compose(cli, f"amm-smoke-{os.getpid()}", certs)
    try:
        compose.run("build", timeout=1500)
        compose.run("up", "--detach", "--scale", f"worker={WORKERS}", timeout=300)
        # The servers only: the certs service has done its work and exited.
        containers = compose.run("ps", "--quiet", "amm", "worker").split()
        assert len(containers) == 1 + WORKERS
        assert {p.name for p in certs.iterdir()} >= {"ca.pem", "operator.pem", "operator-key.pem"}
        assert not (certs / "ca-key.pem").exists()
        poll_until(
            lambda: all(state == "healthy" for state in health(containers)),
            within=180,
            what="health checks of the AMM and the agents",
            every=1.0,
        )

        published = compose.run("port", "amm", "50051").strip()
        address = published.replace("0.0.0.0:", "127.0.0.1:")
        assert grpcurl(certs, address, "grpc.health.v1.Health/Check") == {"status": "SERVING"}

        def registered() -> list[dict[str, Any]] | None:
            method = "amm.v1.ActiveMemoryManager/ListWorkers"
            found = grpcurl(certs, address, method).get("workers", [])
            return found if len(found) == WORKERS else None

        listed = poll_until(registered, within=60, what=f"{WORKERS} workers", every=0.5)
        addresses = sorted(worker["address"] for worker in listed)
        for advertised in addresses:  # each agent's own container IP, with the listen port
            host, _, port = advertised.rpartition(":")
            assert not ipaddress.ip_address(host).is_loopback
            assert port == str(AGENT_PORT)
        assert len(set(addresses)) == WORKERS

        with Client(address, security=Security.from_dir(certs)) as client:
            assert client.status().running  # AMM_START=true
            assert sorted(worker.address for worker in client.workers()) == addresses
        with Client(address, timeout=5) as plaintext, pytest.raises(AmmError):
            plaintext.workers()

        # A key held by each agent alone; after the scale-down every one is still there.
        values = {f"drain-{i}": f"held by {worker}".encode() for i, worker in enumerate(addresses)}
        with Client(address, security=Security.from_dir(certs), timeout=30) as client:
            for (key, value), worker in zip(values.items(), addresses, strict=True):
                client.put(key, value, workers=worker)
            compose.run("up", "--detach", "--scale", f"worker={WORKERS - 1}", timeout=300)
            containers = compose.run("ps", "--quiet", "amm", "worker").split()
            assert len(containers) == WORKERS
            poll_until(
                lambda: len(client.workers()) == WORKERS - 1,
                within=60,
                what="the leaving agent to unregister",
                every=0.5,
            )
            assert client.lost_keys(list(values)) == []
            holders = client.who_has(list(values))
            assert all(holders[key] for key in values), holders
            assert {key: client.get(key) for key in values} == values

        compose.run("stop", "--timeout", "20", timeout=120)
        exit_codes = docker("inspect", "--format", "{{.State.ExitCode}}", *containers).split()
        assert exit_codes == ["0"] * len(containers), "every server stops gracefully on SIGTERM"
    except BaseException:
        print(compose.run("logs", "--no-color", "--tail", "60", check=False))
        raise
    finally:
        compose.run("down", "--volumes", "--remove-orphans", check=False)
