"""Prometheus metrics plumbing shared by the AMM service and the worker agents.

Both processes serve their metrics the same way: a ``CollectorRegistry`` of their own (never the
global one, so an AMM and agents in one test process do not clash), prometheus_client's HTTP
server on ``--metrics-listen``, and collectors that read the process's state at scrape time.
That state belongs to the asyncio loop and the HTTP server answers in a thread of its own, so a
``LoopCollector`` runs its reading on the loop (``call_on_loop``): the figures of one scrape are
consistent with each other and nothing is read while the loop changes it. Counting on the hot
paths stays plain Python (``amm.base.tally``); RPC latency comes from a server interceptor
(``RpcDurations``) that times every call by method.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from amm.base.security import Security, check_listen
from amm.base.security.server_tls import ReloadingServerContext
from amm.base.tally import RPC_BUCKETS, Durations

log = logging.getLogger(__name__)

#: How long a scrape waits for the event loop to read the figures, in seconds. A loop busier
#: than this for one scrape is a problem the failed scrape shows.
READ_TIMEOUT = 5.0
_LISTEN = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>[0-9]{1,5})$")


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; ValueError otherwise."""
    match = _LISTEN.match(listen)
    if match is None or int(match["port"]) > 65535:
        raise ValueError(
            f"expected HOST:PORT with port 0-65535 (e.g. 0.0.0.0:9100 or [::1]:9100), "
            f"got {listen!r}"
        )
    return match["v6"] or match["host"], int(match["port"])


def call_on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], Any], timeout: float) -> Any:
    """``read()`` run on ``loop`` from another thread, its result or its exception returned;
    called on the loop's own thread it simply runs (waiting there would deadlock).

    Raises ``TimeoutError`` when the loop does not get to it within ``timeout`` seconds.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return read()
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(read())
        except BaseException as err:
            done.set_exception(err)

    loop.call_soon_threadsafe(run)
    try:
        return done.result(timeout)
    except concurrent.futures.TimeoutError:
        done.cancel()
        raise TimeoutError(f"the event loop did not answer within {timeout:g} s") from None


class LoopCollector(Collector):
    """A collector whose families are built by ``read`` on the event loop, at each scrape."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read: Callable[[], Iterable[Metric]],
        *,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        self._loop = loop
        self._read = read
        self._timeout = timeout

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = call_on_loop(self._loop, lambda: list(self._read()), self._timeout)
        return families

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: registering must not read the state from another thread."""
        return ()


def histogram(
    name: str, documentation: str, labels: Sequence[str], series: Mapping[Any, Durations]
) -> HistogramMetricFamily:
    """A histogram family of ``series``: label values (a tuple, or one string) -> durations."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for values, durations in sorted(series.items()):
        buckets = [(_bound(b), float(n)) for b, n in durations.cumulative()]
        label_values = [values] if isinstance(values, str) else list(values)
        family.add_metric(label_values, buckets, durations.sum)
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


Handler = Any  # grpc.RpcMethodHandler: a namedtuple of behaviours and (de)serializers
if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic in grpc-stubs only
    _Interceptor = grpc.aio.ServerInterceptor


class RpcDurations(_Interceptor):
    """Times every call a server handles: ``series[(service, method, code)]``.

    A streaming call is timed from its start to its end, so a long-lived stream (an agent's
    Directives stream from the AMM) is observed once, when it ends. Handlers run on the event
    loop, and so do the observations; ``LoopCollector`` reads them there.
    """

    def __init__(self, buckets: Sequence[float] = RPC_BUCKETS) -> None:
        self._buckets = tuple(buckets)
        self.series: dict[tuple[str, str, str], Durations] = {}
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        service, _, method = full.lstrip("/").rpartition("/")
        wrapped = _timed(handler, self._observer(service, method))
        self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _observer(self, service: str, method: str) -> Callable[[str, float], None]:
        def observe(code: str, seconds: float) -> None:
            key = (service, method, code)
            durations = self.series.get(key)
            if durations is None:
                durations = self.series[key] = Durations(self._buckets)
            durations.observe(seconds)

        return observe

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return histogram(name, documentation, ("service", "method", "code"), self.series)


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status a call ended with: what the handler set or aborted with, else OK, or what a
    raised exception becomes."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


def _timed(handler: Handler, observe: Callable[[str, float], None]) -> Handler:
    """``handler`` with its behaviour timed; a synchronous behaviour (run in a thread pool, not
    on the loop) is left as it is."""
    if handler.unary_unary is not None:
        field, behaviour = "unary_unary", handler.unary_unary
    elif handler.unary_stream is not None:
        field, behaviour = "unary_stream", handler.unary_stream
    elif handler.stream_unary is not None:
        field, behaviour = "stream_unary", handler.stream_unary
    else:
        field, behaviour = "stream_stream", handler.stream_stream
    if inspect.isasyncgenfunction(behaviour):

        async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                # Closed with the wrapper: the handler's own clean-up runs when gRPC ends the
                # call, as it would without the wrapper, not whenever the garbage is collected.
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as err:
                error = err
                raise
            finally:
                observe(_code(context, error), time.perf_counter() - started)

        return handler._replace(**{field: streamed})
    if inspect.iscoroutinefunction(behaviour):

        async def awaited(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                observe(_code(context, error), time.perf_counter() - started)

        return handler._replace(**{field: awaited})
    return handler


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on ``listen`` (port 0 picks one).

    With ``certfile`` and ``keyfile`` it serves HTTPS, and with ``client_cafile`` it requires
    client certificates signed by that CA. ``address`` is the bound ``host:port``.
    """

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
    ) -> None:
        host, port = split_listen(listen)
        try:
            self._httpd, self._thread = start_http_server(
                port,
                addr=host,
                registry=registry,
                certfile=certfile,
                keyfile=keyfile,
                client_cafile=client_cafile,
                client_auth_required=client_cafile is not None,
            )
        except OSError as err:
            raise OSError(f"cannot serve metrics on {listen}: {err.strerror or err}") from err
        tls = self._httpd.socket
        if certfile and keyfile and client_cafile and isinstance(tls, ssl.SSLSocket):
            # Follow a rotation of the files at each handshake, as the gRPC ports do.
            reloading = ReloadingServerContext(Path(client_cafile), Path(certfile), Path(keyfile))
            reloading.follow(tls.context)
        bound = self._httpd.server_port
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self._stopped = False

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent. Blocks for up to half a second (the
        server's poll interval): call it from a thread in async code (``astop``)."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


class MetricsEndpoint:
    """One process's metrics: an interceptor for its gRPC server, and ``/metrics`` over HTTP.

    ``interceptors`` go to the gRPC server (``serve``); ``start``, on the event loop, serves the
    families ``read(rpc)`` yields at each scrape on ``listen``, read on that loop; ``address``
    is then the bound ``host:port``. TLS options as for ``MetricsServer``.
    """

    def __init__(
        self,
        listen: str,
        read: Callable[[RpcDurations], Iterable[Metric]],
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
    ) -> None:
        self._listen = listen
        self._read = read
        self._tls = {"certfile": certfile, "keyfile": keyfile, "client_cafile": client_cafile}
        self.rpc = RpcDurations()
        self.registry = new_registry()
        self._server: MetricsServer | None = None

    @classmethod
    def secured(
        cls,
        listen: str,
        read: Callable[[RpcDurations], Iterable[Metric]],
        security: Security | None,
        *,
        insecure: bool = False,
    ) -> MetricsEndpoint:
        """The endpoint of a process that serves gRPC with ``security``: its metrics follow the
        same rule. With TLS, HTTPS with the process's own certificate, and only clients with a
        certificate of the cluster CA may scrape (any identity: a scraper needs no role). Without,
        plaintext, which only a loopback address or ``insecure`` allows (``check_listen``)."""
        check_listen(listen, tls=security is not None, insecure=insecure)
        if security is None:
            return cls(listen, read)
        return cls(
            listen,
            read,
            certfile=str(security.cert),
            keyfile=str(security.key),
            client_cafile=str(security.ca),
        )

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        return [self.rpc]

    @property
    def address(self) -> str:
        return self._server.address if self._server is not None else ""

    def start(self) -> None:
        """Serve; raises ``OSError`` when ``listen`` cannot be bound."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self.registry.register(LoopCollector(loop, lambda: self._read(self.rpc)))
        self._server = MetricsServer(self._listen, self.registry, **self._tls)

    async def stop(self) -> None:
        """Idempotent."""
        if self._server is not None:
            await self._server.astop()


def new_registry() -> CollectorRegistry:
    """A registry of one process's metrics, with the standard ``process_*`` collector."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    return registry
