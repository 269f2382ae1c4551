"""How the compose tests decide to skip: the reason must say what is missing, whatever the CLI."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.support.docker import engine_unavailable

# Debian's docker.io 20.10 CLI with no daemon running, as it answers (both exit 1).
DOCKER_20_10_WITHOUT_DAEMON = """#!/bin/sh
case "$1" in
info) echo "template: :1:2: executing \\"\\" at <.ServerVersion>: reflect: indirection through \\
nil pointer to embedded struct field Info" >&2; echo; exit 1 ;;
version) echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. \\
Is the docker daemon running?" >&2; echo; exit 1 ;;
esac
exit 2
"""


def _on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    docker = tmp_path / "docker"
    docker.write_text(script)
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("AMM_COMPOSE_SMOKE", raising=False)


def test_no_daemon_is_said_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _on_path(tmp_path, monkeypatch, DOCKER_20_10_WITHOUT_DAEMON)
    reason = engine_unavailable()
    assert reason is not None
    assert reason.startswith("no Docker engine reachable")
    assert "Cannot connect to the Docker daemon" in reason


def test_no_cli_and_the_switch_are_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("AMM_COMPOSE_SMOKE", raising=False)
    assert engine_unavailable() == "no docker CLI on PATH"
    monkeypatch.setenv("AMM_COMPOSE_SMOKE", "0")
    assert engine_unavailable() == "AMM_COMPOSE_SMOKE=0"
