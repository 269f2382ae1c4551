"""docker-compose.yml, the Dockerfile and .dockerignore, checked offline: no Docker engine needed.

The compose file must be valid under the compose specification (check-jsonschema's vendored
schema; also ``docker compose config`` where a compose CLI is installed) and keep the promises the
README makes: the AMM cycles from boot on a published port, every server has a grpc.health.v1
check, workers scale, the demo writes its plot into a mounted folder.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from amm.demo import BYTE_SCALE
from amm.replay.command import AGENT_ENV
from scripts.image_requirements import requirements
from tests.support.docker import compose_cli, dockerfile_args

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    found = compose()["services"][name]
    assert isinstance(found, dict)
    return found


def default_of(value: str) -> str:
    """The default of a ``${VAR:-default}`` interpolation."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    assert match, f"{value!r} is not ${{VAR:-default}}"
    return match.group(1)


def test_the_compose_file_is_valid_under_the_compose_spec() -> None:
    assert CHECK_JSONSCHEMA.exists(), "check-jsonschema is installed by the dev extras"
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_compose_cli_accepts_the_file() -> None:
    """``config`` resolves and validates the file without an engine."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (docker compose or docker-compose) is installed")
    result = subprocess.run(
        [*cli, "--file", str(COMPOSE_FILE), "--profile", "demo", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_the_amm_cycles_from_boot_on_a_published_port() -> None:
    amm = service("amm")
    assert amm["command"] == ["amm", "service"]
    env = amm["environment"]
    assert env["AMM_START"] == "true"
    assert env["AMM_LISTEN"] == "0.0.0.0:50051"
    assert env["AMM_STATE"].startswith("/data/")
    assert "amm-state:/data" in amm["volumes"]
    [port] = amm["ports"]
    published = re.fullmatch(r"(\$\{[^}]+\}):(\$\{[^}]+\}):(\d+)", port)
    assert published, port
    host, host_port, container_port = published.groups()
    assert default_of(host) == "127.0.0.1"
    assert default_of(host_port) == "50051"
    assert container_port == "50051"


def test_workers_scale_and_advertise_their_own_address() -> None:
    worker = service("worker")
    assert worker["command"] == ["amm", "agent"]
    env = worker["environment"]
    assert env["AMM_AGENT_AMM"] == "amm:50051"
    assert env["AMM_AGENT_LISTEN"].startswith("0.0.0.0:")
    assert env["AMM_AGENT_ADVERTISE"] == "auto"
    # Anything fixed per container would make `--scale worker=N` fail or collide.
    assert not {"container_name", "hostname", "ports"} & set(worker)
    assert worker["depends_on"]["amm"]["condition"] == "service_healthy"
    # The replay's local agents run with this too: the demo's process memory means the same.
    assert AGENT_ENV.items() <= env.items()


@pytest.mark.parametrize(
    ("name", "listen"), [("amm", "AMM_LISTEN"), ("worker", "AMM_AGENT_LISTEN")]
)
def test_servers_have_a_grpc_health_check_on_their_port(name: str, listen: str) -> None:
    port = service(name)["environment"][listen].rpartition(":")[2]
    check = service(name)["healthcheck"]
    assert check["test"] == ["CMD", "amm", "health", f"127.0.0.1:{port}"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)


def test_the_demo_replays_into_a_mounted_folder_under_its_profile() -> None:
    demo = service("demo")
    assert demo["profiles"] == ["demo"]
    assert demo["entrypoint"] == ["amm-demo"]
    command = demo["command"]
    assert command[0] == "benchmarks/traces/dot-8000.json.gz"
    assert command[command.index("--address") + 1] == "amm:50051"
    assert command[command.index("--amm") + 1] == "both"
    # `make demo`'s sizes: at full size the replay pauses the agents and fails.
    assert float(command[command.index("--byte-scale") + 1]) == BYTE_SCALE
    plot = command[command.index("--plot") + 1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in demo["volumes"]}
    assert str(Path(plot).parent) in mounts
    assert mounts[str(Path(plot).parent)] == "./out"
    assert (ROOT / "out" / ".gitkeep").exists()
    assert {"amm", "worker"} <= set(demo["depends_on"])
    # The demo script runs exactly `amm replay` with the service's arguments.
    assert 'amm replay "$@"' in (ROOT / "docker" / "demo.sh").read_text()


def test_every_service_builds_the_one_image_with_the_dockerfiles_arguments() -> None:
    args = dockerfile_args(DOCKERFILE)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["WHEELHOUSE"] == "wheels"
    builds = [service(name)["build"] for name in compose()["services"]]
    assert all(build == builds[0] for build in builds)
    assert builds[0]["context"] == "."
    assert {name: default_of(value) for name, value in builds[0]["args"].items()} == {
        "BASE_IMAGE": args["BASE_IMAGE"],
        "WHEELHOUSE": args["WHEELHOUSE"],
    }
    assert len({service(name)["image"] for name in compose()["services"]}) == 1


def test_the_dockerfile_runs_unprivileged_stops_on_sigterm_and_ships_the_traces() -> None:
    text = DOCKERFILE.read_text()
    # Both stages, the build and the final one, start from the base image.
    assert re.findall(r"^FROM (.*)$", text, flags=re.MULTILINE) == [
        "${BASE_IMAGE} AS build",
        "${BASE_IMAGE}",
    ]
    assert "COPY --from=build /opt/amm /opt/amm" in text
    assert re.search(r"^USER amm$", text, flags=re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, flags=re.MULTILINE)
    assert "COPY benchmarks/traces /app/benchmarks/traces" in text
    assert "--no-index --find-links /tmp/wheelhouse" in text
    assert (ROOT / "benchmarks" / "traces").is_dir()
    assert (ROOT / "wheels").is_dir()
    for copied in re.findall(r"^COPY (?!\$|--from)(.+) \S+$", text, flags=re.MULTILINE):
        for source in copied.split():
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"


def test_the_build_context_leaves_out_local_environments_and_outputs() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "out", "**/__pycache__"} <= ignored
    assert "wheels" not in ignored


def test_the_image_installs_the_build_system_the_dependencies_and_diagnostics() -> None:
    pyproject = {
        "build-system": {"requires": ["setuptools>=77", "wheel"]},
        "project": {
            "dependencies": ["grpcio>=1", "wheel"],
            "optional-dependencies": {"diagnostics": ["pandas>=2"], "dev": ["ruff"]},
        },
    }
    assert requirements(pyproject, ["diagnostics"]) == [
        "setuptools>=77",
        "wheel",
        "grpcio>=1",
        "pandas>=2",
    ]
    with pytest.raises(ValueError, match="no extra 'plots' \\(known: dev, diagnostics\\)"):
        requirements(pyproject, ["plots"])
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "image_requirements.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.split()
    assert any(line.startswith("setuptools") for line in lines)
    assert any(line.startswith("grpcio-health-checking") for line in lines)
    assert any(line.startswith("matplotlib") for line in lines)
