"""Undecodable requests get INVALID_ARGUMENT and cost one log line per client per interval.

grpc-python decodes a request before the handler sees it. A request that did not decode raised
inside gRPC, which logged a traceback for every call (about 400 a second from one client) and
answered UNKNOWN. ``guard`` wraps a service's method handlers instead: the request deserializer
returns ``Undecodable`` rather than raising, and the handler answers it with INVALID_ARGUMENT,
reporting it through ``Complaints``: at most one log line per client host per ``interval``,
which says how many more that client sent meanwhile. Streams of requests are guarded message by
message. Both servers (the AMM's control service and the agent) register their handlers through
``register_guarded``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from amm.base.throttle import Throttle, client_host

log = logging.getLogger(__name__)

#: A client's undecodable requests are logged at most once per this many seconds.
COMPLAINT_INTERVAL = 10.0
#: Clients remembered at most (the least recently heard of are forgotten first).
MAX_CLIENTS = 4096

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Any  # grpc.RpcMethodHandler: its fields are not typed by grpc-stubs


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a guarded deserializer returns for bytes that are no valid request."""

    error: str


class Complaints:
    """Logs undecodable requests, at most one line per client host per ``interval``."""

    def __init__(
        self,
        logger: logging.Logger = log,
        *,
        interval: float = COMPLAINT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._log = logger
        self._throttle = Throttle(interval=interval, clock=clock, max_keys=max_clients)

    def note(self, peer: str, what: str, error: str) -> None:
        """A request from ``peer`` (``context.peer()``) was undecodable."""
        host = client_host(peer)
        more = self._throttle.admit(host)
        if more is None:
            return
        self._log.warning(
            "undecodable %s from %s: %s%s",
            what,
            host,
            error[:200],
            f" ({more} more from it since the last such line)" if more else "",
        )


def lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserialize`` that returns ``Undecodable`` instead of raising."""

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as err:
            return Undecodable(f"{type(err).__name__}: {err}")

    return decode


async def reject(
    context: Context, complaints: Complaints, method: str, bad: Undecodable
) -> NoReturn:
    """Answer an undecodable request with INVALID_ARGUMENT, and complain once in a while."""
    complaints.note(context.peer(), f"{method} request", bad.error)
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {method} request: {bad.error[:300]}"
    )
    raise AssertionError("abort returned")  # pragma: no cover


def guard(handler: Handler, method: str, complaints: Complaints) -> Handler:
    """``handler`` (a ``grpc.RpcMethodHandler``) with undecodable requests answered
    INVALID_ARGUMENT before its behaviour sees them; the kind of its behaviour (a coroutine
    function or an async generator function) is kept, since grpc.aio tells them apart."""
    if handler.request_deserializer is None:
        return handler
    fields: dict[str, Any] = {"request_deserializer": lenient(handler.request_deserializer)}
    if handler.request_streaming:

        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await reject(context, complaints, method, request)
                yield request

        def inputs(requests: Any, context: Context) -> Any:
            return checked(requests, context)

        name = "stream_stream" if handler.response_streaming else "stream_unary"
    else:

        def inputs(requests: Any, context: Context) -> Any:
            return requests

        name = "unary_stream" if handler.response_streaming else "unary_unary"
    behaviour = getattr(handler, name)

    async def first_look(request: Any, context: Context) -> Any:
        if isinstance(request, Undecodable):
            await reject(context, complaints, method, request)
        return inputs(request, context)

    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behaviour(await first_look(request, context), context):
                yield response

        fields[name] = streaming
    else:

        async def unary(request: Any, context: Context) -> Any:
            return await behaviour(await first_look(request, context), context)

        fields[name] = unary
    return handler._replace(**fields)


class _Collected:
    """Stands in for a server to collect the handlers a generated ``add_*_to_server`` adds."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def collect(add_generated: Callable[[Any, Any], None], servicer: Any) -> dict[str, Handler]:
    """The method handlers ``add_generated(servicer, server)`` would register, by method name."""
    collected = _Collected()
    add_generated(servicer, collected)
    return collected.handlers


def register_guarded(
    server: grpc.aio.Server,
    service: str,
    handlers: dict[str, Handler],
    complaints: Complaints,
) -> None:
    """Register ``handlers`` of ``service`` (a full name) on ``server``, each guarded."""
    guarded = {method: guard(h, method, complaints) for method, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
    server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
