"""Finding Docker for the compose tests: a compose CLI (needs no engine) and a reachable engine.

Each answer is a reason to skip, or None, so that a skipped test says exactly what was missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

#: Set to 0 to skip the compose smoke test even where an engine is reachable (it builds images).
SMOKE_SWITCH = "AMM_COMPOSE_SMOKE"


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2) or ``docker-compose`` (v1), whichever is installed; None if none."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def engine_unavailable() -> str | None:
    """Why the compose smoke test cannot run here, or None when it can."""
    if os.environ.get(SMOKE_SWITCH) == "0":
        return f"{SMOKE_SWITCH}=0"
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH"
    # `docker version`, not `docker info`: without a daemon, Debian's docker.io 20.10 answers
    # `info --format` with a template error, `version` with "Cannot connect to the Docker daemon".
    try:
        version = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "no Docker engine reachable: `docker version` did not answer within 30 s"
    if version.returncode != 0 or not version.stdout.strip():
        said = (version.stderr.strip().splitlines() or ["no server version"])[-1]
        return f"no Docker engine reachable (`docker version`: {said})"
    if compose_cli() is None:
        return "a Docker engine is reachable but no compose CLI (docker compose or docker-compose)"
    return None


def dockerfile_args(dockerfile: Path) -> dict[str, str]:
    """``ARG NAME=default`` lines of ``dockerfile``."""
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", dockerfile.read_text(), flags=re.MULTILINE))


def base_image(dockerfile: Path) -> str:
    """The image the build starts from: ``$BASE_IMAGE``, else the Dockerfile's default."""
    if chosen := os.environ.get("BASE_IMAGE"):
        return chosen
    default = dockerfile_args(dockerfile).get("BASE_IMAGE")
    assert default, f"{dockerfile} declares no default BASE_IMAGE"
    return default


def base_image_unavailable(image: str) -> str | None:
    """Why the build cannot start from ``image`` here (not on the engine, and no registry gives
    it), or None when it can. An engine without a registry is a machine limit, not a defect."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        return None
    try:
        pulled = subprocess.run(
            ["docker", "pull", image], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return f"base image {image} is not on the engine and pulling it took over 300 s"
    if pulled.returncode != 0:
        said = (pulled.stderr.strip().splitlines() or ["no error output"])[-1]
        return (
            f"base image {image} is not on the engine and cannot be pulled ({said}); "
            "build one locally and set BASE_IMAGE"
        )
    return None
