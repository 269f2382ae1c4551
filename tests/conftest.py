"""Shared fixtures: real servers on 127.0.0.1:0 and polling with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from amm.serving import CHANNEL_OPTIONS
from amm.v1 import control_pb2_grpc
from amm_service.config import AmmConfig, load_config
from amm_service.server import AmmServer

T = TypeVar("T")


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    within: float = 10.0,
    every: float = 0.02,
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``accept`` holds; fail with the last value after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last value: {value!r}")
        await asyncio.sleep(every)


def amm_config(tmp_path: Path, **overrides: object) -> AmmConfig:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "amm.sqlite3"),
        "interval": "200ms",
    }
    values.update(overrides)
    return load_config(env={}, overrides=values)


@pytest.fixture
async def amm(tmp_path: Path) -> AsyncIterator[AmmServer]:
    async with AmmServer(amm_config(tmp_path)) as server:
        yield server


@pytest.fixture
async def control(amm: AmmServer) -> AsyncIterator[control_pb2_grpc.ActiveMemoryManagerAsyncStub]:
    async with grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel:
        yield control_pb2_grpc.ActiveMemoryManagerStub(channel)
