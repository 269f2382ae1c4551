"""The AMM's dashboard: a web page of the cluster's memory and the AMM's actions, live.

A small HTTP/1.1 server on asyncio streams, on the AMM's own event loop: it reads the history
(``runtime.observe.history``) and the status where they live, with no thread and no lock, and costs
nothing while nobody looks. It serves ``/`` (the page), ``/static/<file>`` (the page's script
and style, from the package: no CDN, machines may be offline), ``/api/history?after=T`` (the
samples taken after wall-clock time ``T``) and ``/api/status`` (``GetStatus`` as JSON, the very
message the control API answers). Only GET and HEAD.

With ``--tls`` it serves HTTPS with the AMM's certificate and requires a client certificate of
the cluster CA whose identity may call ``GetStatus`` (reader or operator), not revoked. Without
TLS it refuses a non-loopback address unless ``--insecure``, as the gRPC port does. Like the gRPC
ports, it follows a rotation of the CA, certificate and key files at the next handshake
(``ReloadingServerContext``), and reads the revocation list at every connection.

At most ``max_connections`` connections are served at once (a browser keeps a few open); one
beyond gets ``503 Service Unavailable`` with ``Retry-After``, and is closed, so that a crowd of
clients cannot take the AMM's event loop, which also runs the cycles, for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from amm.base.metrics import split_listen
from amm.base.security import Security, SecurityError
from amm.base.security.authz import Denial
from amm.base.security.listen import check_listen
from amm.base.security.server_tls import ReloadingServerContext
from amm_service.runtime.observe.history import History

log = logging.getLogger(__name__)

#: The method whose rule decides who may see the dashboard: whoever may read the status.
STATUS_METHOD = "/amm.v1.ActiveMemoryManager/GetStatus"
#: Seconds a connection may take to send one request, and may stay idle between two.
REQUEST_TIMEOUT = 10.0
MAX_HEADER_LINES = 100
MAX_LINE = 8192
#: Connections served at once, at most: a browser holds up to six; a few people and scripts.
MAX_CONNECTIONS = 32
#: Seconds a connection beyond the cap has to send its request before its 503.
REFUSE_TIMEOUT = 2.0
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_HEADERS = (
    "Cache-Control: no-store\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Content-Security-Policy: default-src 'self'; img-src 'self' data:\r\n"
    "Referrer-Policy: no-referrer\r\n"
)


def static_files() -> dict[str, bytes]:
    """The page's files, by name, read once from the package."""
    folder = resources.files("amm_service.api") / "static"
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and any(entry.name.endswith(ext) for ext in _TYPES)
    }


def _content_type(name: str) -> str:
    return next((t for ext, t in _TYPES.items() if name.endswith(ext)), "application/octet-stream")


class _Response:
    __slots__ = ("body", "code", "content_type", "headers")

    def __init__(
        self,
        code: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: str = "",
    ):
        self.code = code
        self.body = body
        self.content_type = content_type
        self.headers = headers
        """More header lines, each ending with CRLF."""


def _json(value: Any) -> _Response:
    return _Response(200, json.dumps(value, separators=(",", ":")).encode(), "application/json")


class Dashboard:
    """The dashboard server on ``listen``; ``address`` is the bound ``host:port`` once started.

    ``status`` builds the ``GetStatus`` answer as JSON; ``history`` is the AMM's history.
    """

    def __init__(
        self,
        listen: str,
        history: History,
        status: Callable[[], Awaitable[dict[str, Any]]],
        *,
        security: Security | None = None,
        insecure: bool = False,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self._listen = listen
        self._history = history
        self._status = status
        self._security = security
        self._insecure = insecure
        self._files = static_files()
        self._server: asyncio.Server | None = None
        self._authorizer = security.authorizer() if security is not None else None
        self._connections: set[asyncio.Task[None]] = set()
        self._max_connections = max_connections
        self._refusing = 0
        """Connections beyond the cap being answered 503 (at most as many again)."""
        self.address = ""

    def _ssl_context(self) -> ssl.SSLContext | None:
        security = self._security
        if security is None:
            return None
        if security.cert is None or security.key is None:
            raise SecurityError("the dashboard needs the AMM's certificate to serve HTTPS")
        return ReloadingServerContext(security.ca, security.cert, security.key).context

    async def start(self) -> None:
        """Serve; ``SecurityError`` on a non-loopback address without TLS or ``--insecure``,
        ``OSError`` when the address cannot be bound."""
        check_listen(self._listen, self._security is not None, self._insecure)
        host, port = split_listen(self._listen)
        try:
            self._server = await asyncio.start_server(
                self._connection,
                host,
                port,
                ssl=self._ssl_context(),
                ssl_handshake_timeout=REQUEST_TIMEOUT if self._security is not None else None,
                limit=MAX_LINE,
            )
        except OSError as err:
            raise OSError(
                f"cannot serve the dashboard on {self._listen}: {err.strerror or err}"
            ) from err
        bound = self._server.sockets[0].getsockname()[1]
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def stop(self) -> None:
        """Idempotent; ends open connections too (a browser keeps one alive)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            await self._refuse(reader, writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            denial = self._deny(writer)
            while True:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        request = await _read_request(reader)
                except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
                    return
                if request is None:
                    return
                method, target = request
                if denial is not None:
                    response = _Response(403, f"{denial}\n".encode())
                elif method not in ("GET", "HEAD"):
                    response = _Response(405, b"only GET and HEAD\n")
                else:
                    response = await self._route(target)
                await _write(writer, response, head=method == "HEAD")
        except (ConnectionError, ssl.SSLError):
            pass
        except Exception:
            log.exception("dashboard: a connection failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection beyond the cap: read its request (a client that sent it reads an answer
        sent before it more reliably), answer 503 and close. Beyond as many again, close."""
        if self._refusing >= self._max_connections:
            writer.close()
            return
        self._refusing += 1
        try:
            async with asyncio.timeout(REFUSE_TIMEOUT):
                request = await _read_request(reader)
            if request is not None:
                body = (
                    f"the dashboard serves {self._max_connections} connections at once, all in "
                    "use; try again shortly\n"
                )
                response = _Response(503, body.encode(), headers="Retry-After: 1\r\n")
                await _write(writer, response, head=request[0] == "HEAD", close=True)
        except (TimeoutError, ValueError, ConnectionError, ssl.SSLError):
            pass  # it did not ask in time, or asked nothing readable: closed unanswered
        finally:
            self._refusing -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _deny(self, writer: asyncio.StreamWriter) -> str | None:
        """Why this connection's client may not see the dashboard; None if it may (or no TLS)."""
        if self._authorizer is None:
            return None
        ssl_object: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return "a client certificate of the cluster CA is required"
        context = {
            "transport_security_type": [b"ssl"],
            "x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()],
        }
        decision = self._authorizer.authenticate(context, ())
        if isinstance(decision, Denial):
            return decision.message
        denied = self._authorizer.authorize(STATUS_METHOD, decision)
        if denied is not None:
            return f"the dashboard needs role reader or operator; you are {decision}"
        return None

    async def _route(self, target: str) -> _Response:
        url = urlsplit(target)
        path = url.path
        try:
            if path in ("/", "/index.html"):
                return _Response(200, self._files["index.html"], _TYPES[".html"])
            if path.startswith("/static/"):
                name = path.removeprefix("/static/")
                body = self._files.get(name)
                if body is None:
                    return _Response(404, b"no such file\n")
                return _Response(200, body, _content_type(name))
            if path == "/api/history":
                return self._history_json(url.query)
            if path == "/api/status":
                return _json(await self._status())
        except ValueError as err:
            return _Response(400, f"{err}\n".encode())
        except Exception:
            log.exception("dashboard: %s failed", path)
            return _Response(500, b"failed; see the AMM log\n")
        return _Response(404, b"not found\n")

    def _history_json(self, query: str) -> _Response:
        values = parse_qs(query).get("after", ["0"])
        try:
            after = float(values[-1])
        except ValueError:
            raise ValueError(f"after must be a number of seconds, not {values[-1]!r}") from None
        return _Response(200, self._history.json_after(after), "application/json")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """``(method, target)`` of the next request, its headers read and ignored (a GET has no
    body); None at the end of the connection. ValueError on a malformed request."""
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    for _ in range(MAX_HEADER_LINES):
        header = await reader.readline()
        if not header:
            return None
        if header in (b"\r\n", b"\n"):
            return parts[0], parts[1]
    raise ValueError("too many headers")


async def _write(
    writer: asyncio.StreamWriter, response: _Response, *, head: bool, close: bool = False
) -> None:
    reason = _REASONS.get(response.code, "")
    extra = response.headers + ("Connection: close\r\n" if close else "")
    writer.write(
        (
            f"HTTP/1.1 {response.code} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"{extra}{_HEADERS}\r\n"
        ).encode()
    )
    if not head:
        writer.write(response.body)
    await writer.drain()
