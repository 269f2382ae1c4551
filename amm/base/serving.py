"""gRPC server plumbing shared by the AMM service and the worker agents.

Both servers offer the same extras (health checking, reflection for grpcurl) and stop the same way
(health NOT_SERVING first, then ``server.stop(grace)``), so that part lives here once. What each
server serves is its own business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from amm.base import lifeline

# grpc-stubs does not describe the asyncio health servicer.
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

#: Upper bound of one gRPC message; values travel in chunks well below it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]


class Served:
    """A started server with its health servicer; ``stop`` is idempotent."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: Any,
        port: int,
        services: list[str],
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self._services = services
        self._stopped = False

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._services]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.set_serving(False)
        await self.server.stop(grace)


async def serve(
    listen: str,
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: list[str],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> Served:
    """Create, bind and start a server on ``listen`` (``host:port``, port 0 picks one).

    ``register`` adds the servicers; ``service_names`` are their full names, for health and
    reflection; ``interceptors`` see every call (metrics time them). Raises ``OSError`` when the
    address cannot be bound.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors) or None)
    for add in register:
        add(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {listen}: {err}") from err
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address unavailable")
    await server.start()
    served = Served(server, health_servicer, port, service_names)
    await served.set_serving(True)
    return served


def bound_address(listen: str, port: int) -> str:
    """The ``host:port`` actually bound, given the requested one and the port the server picked."""
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM or SIGINT while inside the block (containers run us as PID 1),
    or once the launcher that started us is gone (``amm.base.lifeline``).

    The handlers are installed whatever the signals' inherited disposition: a process started in
    the background by a non-interactive shell inherits SIGINT ignored, and would never stop on it.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    unwatch = lifeline.watch(lambda: _launcher_gone(stop))
    try:
        yield
    finally:
        unwatch()
        for sig in installed:
            loop.remove_signal_handler(sig)


def _launcher_gone(stop: asyncio.Event) -> None:
    log.warning("the process that launched this one is gone: stopping")
    stop.set()
