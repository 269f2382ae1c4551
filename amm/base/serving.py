"""gRPC plumbing shared by the AMM service, the worker agents and the client.

Both servers offer the same extras (health checking, reflection for grpcurl), are secured the
same way (``amm.base.security``: a mutual-TLS port, an optional bearer-token port, one authorizer)
and stop the same way (health NOT_SERVING first, then ``server.stop(grace)``), so that part lives
here once. What each server serves is its own business. Every process dials through
``open_channel``, so plaintext or TLS is decided in one place.
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
from amm.base.security import Role, Security, SecurityError, check_listen, expect_role

# grpc-stubs does not describe the asyncio health servicer.
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

#: Upper bound of one gRPC message; values travel in chunks well below it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

ChannelOptions = Sequence[tuple[str, str | int]]

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
    """A started server with its health servicer; ``stop`` is idempotent. ``token_port`` is the
    bearer-token port's, when one was asked for."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: Any,
        port: int,
        services: list[str],
        token_port: int | None = None,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.token_port = token_port
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
    security: Security | None = None,
    token_listen: str | None = None,
    insecure: bool = False,
) -> Served:
    """Create, bind and start a server on ``listen`` (``host:port``, port 0 picks one).

    ``register`` adds the servicers; ``service_names`` are their full names, for health and
    reflection; ``interceptors`` see every call (metrics time them). With ``security`` the port is
    mutual TLS and every call goes through its authorizer; ``token_listen`` adds a TLS port where
    bearer tokens authenticate (gRPC Python cannot ask for a client certificate without requiring
    it, hence two ports). Without ``security`` it is plaintext, which only a loopback address or
    ``insecure`` allows.

    Raises ``SecurityError`` for a plaintext open address or unusable TLS files, ``OSError``
    when an address cannot be bound; both before anything listens.
    """
    check_listen(listen, tls=security is not None, insecure=insecure)
    credentials = token_credentials = None
    if security is not None:
        credentials = security.server_credentials()
        if token_listen:
            token_credentials = security.token_server_credentials()
    elif token_listen:
        raise SecurityError("a token port needs TLS: pass --tls DIR with --token-listen")
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        # Metrics first, so that refused calls are timed too.
        interceptors=[*interceptors, *([security.authorizer()] if security is not None else [])]
        or None,
    )
    for add in register:
        add(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = _bind(server, listen, credentials)
    token_port = _bind(server, token_listen, token_credentials) if token_listen else None
    await server.start()
    served = Served(server, health_servicer, port, service_names, token_port)
    await served.set_serving(True)
    return served


def _bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {listen}: {err}") from err
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address unavailable")
    return port


def _options(options: ChannelOptions, expect: Role | None) -> list[tuple[str, str | int]]:
    return [*options, *(expect_role(expect) if expect is not None else ())]


def open_channel(
    address: str,
    security: Security | None = None,
    *,
    expect: Role | None = None,
    options: ChannelOptions = CHANNEL_OPTIONS,
) -> grpc.aio.Channel:
    """A channel to ``address``: plaintext without ``security``, else TLS trusting only the
    cluster CA and presenting ``security``'s certificate (and token, if any).

    TLS checks that the server's certificate names ``address``'s host, or with ``expect`` that
    it is any server of that role: agents are dialled by advertised addresses (container IPs)
    that no certificate lists, so everyone dials them with ``expect=Role.AGENT``.
    """
    if security is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, security.channel_credentials(), options=_options(options, expect)
    )


def open_blocking_channel(
    address: str,
    security: Security | None = None,
    *,
    expect: Role | None = None,
    options: ChannelOptions = (),
) -> grpc.Channel:
    """``open_channel`` for synchronous callers (``amm health``, a probe that runs once)."""
    if security is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(
        address, security.channel_credentials(), options=_options(options, expect)
    )


def bound_address(listen: str, port: int) -> str:
    """The ``host:port`` actually bound, given the requested one and the port the server picked."""
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM or SIGINT while inside the block (containers run us as PID 1),
    or once the launcher that started us is gone (``amm.base.lifeline``)."""
    with handle_stop_signals(lambda _: stop.set(), stop.set):
        yield


@contextlib.contextmanager
def handle_stop_signals(
    on_signal: Callable[[signal.Signals], None], on_launcher_gone: Callable[[], None]
) -> Iterator[None]:
    """Call ``on_signal(sig)`` on SIGTERM or SIGINT while inside the block, and
    ``on_launcher_gone()`` once the launcher that started us is gone (``amm.base.lifeline``).

    The handlers are installed whatever the signals' inherited disposition: a process started in
    the background by a non-interactive shell inherits SIGINT ignored, and would never stop on it.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    def launcher_gone() -> None:
        log.warning("the process that launched this one is gone: stopping")
        on_launcher_gone()

    unwatch = lifeline.watch(launcher_gone)
    try:
        yield
    finally:
        unwatch()
        for sig in installed:
            loop.remove_signal_handler(sig)
