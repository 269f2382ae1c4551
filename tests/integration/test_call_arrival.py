"""Bulk work in the AMM's loop makes way for a control call from the moment gRPC hands the call to
the loop, not only once its handler runs (``pacing.watch_arrivals``): a unary call takes four
turns of the loop or more to reach its handler (the call handed over by gRPC's poller thread, two
tasks that schedule it, its request read), and bulk work under way took up to a budget in
several of them.

A real grpc.aio server on loopback holds a call on its way to the handler (an interceptor that
waits), so that the test sees the arrival under way; the bulk work counts its slices by a clock
of its own: nothing is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import pytest_asyncio

from amm_service.api.control import _edge
from amm_service.runtime.loop import pacing
from tests.support.pacing import PacedBulk
from tests.support.waiting import wait_for

SERVICE = "amm.test.Arrival"
#: Bytes in, bytes out.
RAW: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic in grpc-stubs only
    _Interceptor = grpc.aio.ServerInterceptor


class _Held(_Interceptor):
    """Holds every call on its way to the handler until ``go`` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.holding = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        self.holding += 1
        await self.go.wait()
        return await continuation(handler_call_details)


class _Servicer:
    """A control handler as the AMM's are, under ``_edge``."""

    @_edge
    async def Ping(self, request: bytes, context: Any) -> bytes:
        return b"pong:" + request


@pytest.fixture
def arrivals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a handler ends a call's hurry here (the bound on it, ``ARRIVAL``, is a minute), and
    what other tests left of arrivals does not count."""
    monkeypatch.setattr(pacing, "ARRIVAL", 60.0)
    monkeypatch.setattr(pacing, "_arriving", 0)
    monkeypatch.setattr(pacing, "_arrival_ends", 0.0)


@pytest_asyncio.fixture
async def held_server(arrivals: None) -> AsyncIterator[tuple[_Held, grpc.aio.Channel]]:
    pacing.watch_arrivals(asyncio.get_running_loop())
    held = _Held()
    server = grpc.aio.server(interceptors=[held])
    handler = grpc.unary_unary_rpc_method_handler(_Servicer().Ping)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Ping": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield held, channel
    finally:
        held.go.set()
        await server.stop(None)


async def test_bulk_work_makes_way_for_a_call_from_its_arrival_until_its_handler_runs(
    held_server: tuple[_Held, grpc.aio.Channel],
) -> None:
    held, channel = held_server
    ping = channel.unary_unary(f"/{SERVICE}/Ping", **RAW)
    bulk = PacedBulk()
    work = asyncio.create_task(bulk.run())
    try:
        usual = round(pacing.BUDGET / PacedBulk.SLICE)
        assert await bulk.per_breath() >= usual - 1, "a budget of work between breaths"
        call = ping(b"x", timeout=30)  # under way at once
        await wait_for(lambda: held.holding == 1, what="the call on its way to its handler")
        assert await bulk.per_breath() <= 1.5, "a breath after (about) every slice meanwhile"
        held.go.set()
        assert await asyncio.wait_for(call, 10) == b"pong:x"
        assert await bulk.per_breath() >= usual - 1, "as before once its handler ran"
    finally:
        bulk.stop = True
        await work


async def test_watching_arrivals_twice_counts_each_call_once(
    held_server: tuple[_Held, grpc.aio.Channel],
) -> None:
    """Each AMM server started in a loop watches it; a second watch must not count calls
    twice, or the handler's word would leave the call hurrying bulk work."""
    held, channel = held_server
    pacing.watch_arrivals(asyncio.get_running_loop())
    held.go.set()
    assert await channel.unary_unary(f"/{SERVICE}/Ping", **RAW)(b"y", timeout=30) == b"pong:y"
    assert not pacing.hurried()


def test_a_call_that_never_reaches_a_handler_hurries_bulk_work_for_a_while_only(
    arrivals: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's handler, or a call cancelled before its handler ran, never says it arrived:
    the hurry ends after ``ARRIVAL`` seconds all the same."""
    pacing.arriving()
    assert pacing.hurried()
    monkeypatch.setattr(pacing, "_arrival_ends", 0.0)  # ARRIVAL seconds later
    assert not pacing.hurried()
    pacing.arrived()  # late: counts nothing
    pacing.arriving()
    pacing.arrived()
    assert not pacing.hurried(), "none left arriving"
