"""Shared fixtures: real servers on 127.0.0.1:0 and polling with a deadline."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2_grpc
from amm_service.api.server import AmmServer
from amm_service.config import AmmConfig, load_config

T = TypeVar("T")


def amm_config(tmp_path: Path, **overrides: object) -> AmmConfig:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "amm.sqlite3"),
        "interval": "200ms",
    }
    values.update(overrides)
    return load_config(env={}, overrides=values)


def free_port() -> int:
    """A port free on 127.0.0.1 right now: for an AMM restarted at the same address, as its
    agents expect (they take epochs and peers only from the AMM they are configured with)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def amm(tmp_path: Path) -> AsyncIterator[AmmServer]:
    async with AmmServer(amm_config(tmp_path)) as server:
        yield server


@pytest.fixture
async def control(amm: AmmServer) -> AsyncIterator[control_pb2_grpc.ActiveMemoryManagerAsyncStub]:
    async with grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel:
        yield control_pb2_grpc.ActiveMemoryManagerStub(channel)
