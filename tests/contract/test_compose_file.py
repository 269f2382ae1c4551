"""docker-compose.yml, the Dockerfile and .dockerignore, checked offline: no Docker engine needed.

The compose file must be valid under the compose specification (check-jsonschema's vendored
schema; also ``docker compose config`` where a compose CLI is installed) and keep the promises the
README makes: the AMM cycles from boot on a published port, every server has a grpc.health.v1
check, workers scale, the demo writes its plot into a mounted folder, and every server runs on
mutual TLS with certificates from a one-shot service, the agents reachable only inside the
network. The certificate script itself runs here, outside any container.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from amm.base.security import Identity, Role
from amm.base.security.certs import certificate_identity, load_certificate
from amm.base.units import parse_duration
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
        [
            *cli,
            *("--file", str(COMPOSE_FILE), "--profile", "demo", "--profile", "monitoring"),
            *("config", "--quiet"),
        ],
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
    # The gRPC port first; the dashboard's is the only other (test_compose_dashboard).
    port = amm["ports"][0]
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


@pytest.mark.parametrize("name", ["amm", "worker"])
def test_health_checks_leave_room_for_a_loaded_host(name: str) -> None:
    """Seen on a 2-core host at a load of 14-26: a probe (a Python start and one call) took 12-16 s;
    with a 10 s timeout five failed in a row, the AMM turned unhealthy and the next ``up`` (which
    checks depends_on again) refused to scale. The probes also cost CPU: not every few seconds."""
    check = service(name)["healthcheck"]
    assert parse_duration(check["timeout"]) >= 30
    assert parse_duration(check["interval"]) >= 10
    assert check["retries"] >= 3


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
    project = [name for name in compose()["services"] if name != "prometheus"]
    builds = [service(name)["build"] for name in project]
    assert all(build == builds[0] for build in builds)
    assert builds[0]["context"] == "."
    assert {name: default_of(value) for name, value in builds[0]["args"].items()} == {
        "BASE_IMAGE": args["BASE_IMAGE"],
        "WHEELHOUSE": args["WHEELHOUSE"],
    }
    assert len({service(name)["image"] for name in project}) == 1


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


def mounts(name: str) -> dict[str, str]:
    """Container path -> ``source[:options]`` of a service's volumes."""
    found = {}
    for volume in service(name).get("volumes", []):
        # The source may be ${VAR:-default}, whose ":-" is no separator.
        match = re.fullmatch(r"(.+?):(/[^:]*)(?::(\w+))?", volume)
        assert match, volume
        source, target, options = match.groups()
        found[target] = f"{source}:{options}" if options else source
    return found


def test_a_one_shot_service_makes_the_certificates_before_any_server_starts() -> None:
    certs = service("certs")
    assert certs["restart"] == "no"
    command = certs["command"]
    assert command[0] == "amm-compose-certs"
    # Agents dial the AMM as amm:50051: its certificate must name it.
    assert command[command.index("--san") + 1] == "amm"
    found = mounts("certs")
    assert default_of(found.pop("/client")) == "./certs"
    assert found == {"/ca": "ca", "/certs": "certs"}
    assert mounts("amm")["/certs"] == "certs:ro"
    assert mounts("worker")["/certs"] == "certs:ro"
    # The CA's key is in volume `ca`, which no server mounts.
    assert {name for name in compose()["services"] if "/ca" in mounts(name)} == {"certs"}
    assert set(compose()["volumes"]) == {"amm-state", "ca", "certs", "prometheus-data"}
    assert service("amm")["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    dockerfile = DOCKERFILE.read_text()
    assert "COPY docker/certs.sh /usr/local/bin/amm-compose-certs" in dockerfile
    assert "/certs /ca /client" in dockerfile, "mount points owned by amm, so new volumes are"
    assert (ROOT / "certs" / ".gitkeep").exists(), "./certs must exist, owned by the user"
    assert "certs/*" in (ROOT / ".gitignore").read_text().split()


def test_every_server_runs_on_mutual_tls_and_only_the_amm_is_published() -> None:
    amm, worker = service("amm")["environment"], service("worker")["environment"]
    assert amm["AMM_TLS"] == "/certs"
    assert "AMM_INSECURE" not in amm
    assert worker["AMM_AGENT_TLS"] == "/certs"
    assert worker["AMM_AGENT_TLS_IDENTITY"] == "agent"
    assert "AMM_AGENT_INSECURE" not in worker
    # The health probes present the server's own identity (health is open, the handshake not).
    assert (amm["AMM_TLS"], amm["AMM_IDENTITY"]) == ("/certs", "amm")
    assert (worker["AMM_TLS"], worker["AMM_IDENTITY"]) == ("/certs", "agent")
    published = {name for name, s in compose()["services"].items() if "ports" in s}
    assert published == {"amm", "prometheus"}, "prometheus under its profile only"
    demo = service("demo")
    assert demo["environment"]["AMM_TLS"] == "/client"
    source, options = mounts("demo")["/client"].rsplit(":", 1)
    assert (default_of(source), options) == ("./certs", "ro")


def test_the_readme_shows_grpcurl_with_the_tls_flags() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run the cluster with docker compose") :]
    section = section[: section.index("\n## ", 1)]
    flags = "-cacert certs/ca.pem -cert certs/operator.pem -key certs/operator-key.pem"
    assert f"grpcurl {flags} 127.0.0.1:50051" in section
    assert "-plaintext" not in section


def test_the_certificate_script_hands_each_side_only_its_own(tmp_path: Path) -> None:
    """docker/certs.sh as the certs service runs it, in folders here: the servers' volume gets
    no CA key and no operator key, the host's folder gets the operator and reader, and a second
    run keeps the CA and re-publishes."""
    amm_command = shutil.which("amm", path=str(Path(sys.executable).parent))
    assert amm_command is not None
    folders = {name: tmp_path / name for name in ("ca", "servers", "clients")}
    folders["clients"].mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(amm_command).parent}{os.pathsep}{os.environ['PATH']}",
        "AMM_CERTS_CA": str(folders["ca"]),
        "AMM_CERTS_SERVERS": str(folders["servers"]),
        "AMM_CERTS_CLIENTS": str(folders["clients"]),
        "AMM_CERTS_USER": pwd.getpwuid(os.getuid()).pw_name,
    }
    command = service("certs")["command"]
    script = ROOT / "docker" / "certs.sh"
    for _ in range(2):
        result = subprocess.run(
            ["sh", str(script), *command[1:]], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    servers = {p.name for p in folders["servers"].iterdir()}
    # The reader's too: Prometheus scrapes with it, and it can steer nothing.
    assert servers == {
        "ca.pem",
        "amm.pem",
        "amm-key.pem",
        "agent.pem",
        "agent-key.pem",
        "reader.pem",
        "reader-key.pem",
    }
    clients = {p.name for p in folders["clients"].iterdir()}
    assert clients == {"ca.pem", "operator.pem", "operator-key.pem", "reader.pem", "reader-key.pem"}
    assert (folders["ca"] / "ca-key.pem").exists()
    amm_cert = load_certificate(folders["servers"] / "amm.pem")
    assert certificate_identity(amm_cert) == Identity(Role.AMM, "amm")
    assert (folders["servers"] / "ca.pem").read_bytes() == (folders["ca"] / "ca.pem").read_bytes()


PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
PROMETHEUS_DOCKERFILE = ROOT / "docker" / "prometheus.Dockerfile"


def test_prometheus_runs_only_under_its_profile_built_here_on_loopback() -> None:
    """Not part of the default ``up``; built from Debian's package on the project's base image
    (nothing else pulled); its UI, which has no authentication, on the host's loopback only."""
    prometheus = service("prometheus")
    assert prometheus["profiles"] == ["monitoring"]
    assert "profiles" not in service("amm")
    assert "profiles" not in service("worker")
    build = prometheus["build"]
    assert (ROOT / build["context"] / build["dockerfile"]) == PROMETHEUS_DOCKERFILE
    base = dockerfile_args(DOCKERFILE)["BASE_IMAGE"]
    assert default_of(build["args"]["BASE_IMAGE"]) == base
    assert dockerfile_args(PROMETHEUS_DOCKERFILE)["BASE_IMAGE"] == base
    text = PROMETHEUS_DOCKERFILE.read_text()
    assert re.findall(r"^FROM (.*)$", text, flags=re.MULTILINE) == ["${BASE_IMAGE}"]
    assert "apt-get install -y --no-install-recommends prometheus" in text
    assert re.search(r"^USER amm$", text, flags=re.MULTILINE), "uid 10001 reads the certs volume"
    assert "--uid 10001" in text
    assert "--uid 10001" in DOCKERFILE.read_text()
    (port,) = prometheus["ports"]
    published = re.fullmatch(r"127\.0\.0\.1:(\$\{[^}]+\}):9090", port)
    assert published, port
    assert default_of(published.group(1)) == "9090"
    found = mounts("prometheus")
    assert found["/certs"] == "certs:ro"
    assert found["/prometheus"] == "prometheus-data"
    config_source, options = found["/etc/amm/prometheus.yml"].rsplit(":", 1)
    assert (ROOT / config_source) == PROMETHEUS_CONFIG
    assert options == "ro"
    assert "--config.file=/etc/amm/prometheus.yml" in text


def test_prometheus_scrapes_the_amm_and_every_agent_over_mutual_tls() -> None:
    """Both jobs on the ports the servers' metrics listen on, over HTTPS with a client
    certificate the certs service publishes into volume ``certs``, checking each server by a
    name its certificate carries (agents are found at their IPs, which none lists)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"amm", "amm-agents"}
    amm_port = service("amm")["environment"]["AMM_METRICS_LISTEN"].rsplit(":", 1)[1]
    worker_port = service("worker")["environment"]["AMM_AGENT_METRICS_LISTEN"].rsplit(":", 1)[1]
    assert jobs["amm"]["static_configs"] == [{"targets": [f"amm:{amm_port}"]}]
    (sd,) = jobs["amm-agents"]["dns_sd_configs"]
    assert (sd["names"], sd["type"], sd["port"]) == (["worker"], "A", int(worker_port))
    published = {"ca.pem", "reader.pem", "reader-key.pem"}  # the least it needs: a reader
    names = {"amm": Role.AMM.server_name, "amm-agents": Role.AGENT.server_name}
    for name, job in jobs.items():
        assert job["scheme"] == "https", name
        tls = job["tls_config"]
        for field in ("ca_file", "cert_file", "key_file"):
            folder, file = tls[field].rsplit("/", 1)
            assert (folder, file in published) == ("/certs", True), (name, field)
        assert tls["server_name"] == names[name], name
        assert "insecure_skip_verify" not in tls


def test_the_servers_certificates_carry_the_names_prometheus_checks(tmp_path: Path) -> None:
    amm_command = shutil.which("amm", path=str(Path(sys.executable).parent))
    assert amm_command is not None
    sans = service("certs")["command"][1:]
    subprocess.run(
        [amm_command, "certs", "init", str(tmp_path), *sans],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for job, identity in (("amm", "amm"), ("amm-agents", "agent")):
        (tls,) = [j["tls_config"] for j in config["scrape_configs"] if j["job_name"] == job]
        cert = x509.load_pem_x509_certificate((tmp_path / f"{identity}.pem").read_bytes())
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert tls["server_name"] in dns.get_values_for_type(x509.DNSName), job


def test_the_readme_says_how_to_start_and_open_prometheus() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run the cluster with docker compose") :]
    section = section[: section.index("\n## ", 1)]
    assert "docker compose --profile monitoring up -d" in section
    assert "http://127.0.0.1:9090" in section
