"""Who may call what: the rule table and the server interceptor that enforces it.

Deny by default: a method without a rule in ``RULES`` is refused (PERMISSION_DENIED, "no rule
for ..."), so a new RPC fails closed until someone decides who may call it. Each call is
authenticated first, from the verified peer certificate (its URI SAN) or else from
``authorization: Bearer <token>`` against the token file: without either the call fails
UNAUTHENTICATED; a known caller whose role the rule does not list fails PERMISSION_DENIED naming
the role needed. Revoked names and serials, and certificates expired since the connection was
made, fail UNAUTHENTICATED.

``grpc.aio`` server interceptors do not see the call's context, so ``Authorizer`` wraps the
method's handler: the wrapper checks (with the context) and then runs the original. Handlers
learn the caller from ``caller()``, e.g. for an agent to register only under its own name.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import grpc

from amm.base.security.certs import certificate_identity
from amm.base.security.identity import Identity, Role
from amm.base.security.revocation import Revocations
from amm.base.security.tokens import TokenFile
from amm.base.throttle import Throttle, client_host

if TYPE_CHECKING:
    from cryptography import x509
else:  # imported when first used: see ``lazy``
    from amm.base.security.lazy import Lazy

    x509 = Lazy("cryptography.x509")

CONTROL = "/amm.v1.ActiveMemoryManager/"
AGENT = "/amm.v1.WorkerAgent/"
HEALTH = "/grpc.health.v1.Health/"

_READ = frozenset({Role.READER, Role.OPERATOR})
_OPERATE = frozenset({Role.OPERATOR})
_AGENT = frozenset({Role.AGENT})
_AMM = frozenset({Role.AMM})

#: Full method name -> the roles that may call it. ``operator`` may do all that ``reader`` may.
RULES: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        # The control plane (the AMM's port): reading, steering, and agents (un)registering.
        **{
            CONTROL + m: _READ
            for m in ("Running", "GetStatus", "ListWorkers", "HasWhat", "ListGoals", "ListLost")
        },
        # Following the AMM's events is reading: the same roles as GetStatus, which lists them.
        CONTROL + "WatchEvents": _READ,
        CONTROL + "WhoHas": _READ,
        # Agents confirm epochs and peers, and the content of keys before they store or delete.
        CONTROL + "GetMembership": _AGENT,
        CONTROL + "LookupKeys": _AGENT,
        **{
            CONTROL + m: _OPERATE
            for m in ("Start", "Stop", "RunOnce", "RetireWorkers", "Replicate", "Forget")
        },
        CONTROL + "RegisterWorker": _AGENT,
        CONTROL + "UnregisterWorker": _AGENT,
        # An agent that is shutting down asks to be drained (itself only, checked by the handler).
        CONTROL + "DrainWorker": _AGENT,
        # The agent plane (each agent's port): the AMM steers, operators move data, peers fetch.
        **{AGENT + m: _AMM for m in ("Poll", "HoldsKeys", "Directives", "Close", "Delete")},
        **{AGENT + m: _OPERATE for m in ("Put", "PutMany", "Get", "Pin", "Unpin")},
        **{AGENT + m: _AGENT for m in ("Fetch", "PromiseKeep", "PromiseKeepBatch")},
        # grpcurl's `list` and `describe`; Health/List names the services, so it is not open.
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _READ,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _READ,
        HEALTH + "List": _READ,
    }
)
#: Callable without any credentials: container and load-balancer probes carry none, and a
#: serving status tells an attacker nothing that a TCP connect does not. (On a mutual-TLS port the
#: handshake still wants a certificate of the CA; a probe can present the server's own.)
OPEN_METHODS: frozenset[str] = frozenset({HEALTH + "Check", HEALTH + "Watch"})

CREDENTIALS_REQUIRED = (
    "credentials required: a client certificate of the cluster CA or a bearer token"
)
#: Denials of one peer host and method are logged at most once per this many seconds.
LOG_INTERVAL = 60.0
_CACHE_SIZE = 1024

log = logging.getLogger(__name__)

_CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "amm_caller", default=None
)


def caller() -> Identity | None:
    """The identity of the caller of the RPC being handled; None outside an authorized call (or
    for the open health methods, or when the server runs without security)."""
    return _CALLER.get()


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a call is refused, as the status code and message the caller gets."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True, slots=True)
class _Certified:
    identity: Identity
    serial: int
    not_after: dt.datetime


def _values(auth_context: Mapping[str, Iterable[bytes]], name: str) -> list[bytes]:
    return list(auth_context.get(name, ()))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | Denial | None:
    """The token of an ``authorization: Bearer <token>`` header; None without the header."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Denial(grpc.StatusCode.UNAUTHENTICATED, "expected authorization: Bearer <token>")
        return token.strip()
    return None


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticate and authorize every call of a ``grpc.aio`` server (its ``interceptors``).

    ``tokens``: the token file (None: no token is accepted); ``revoked``: the revocation list;
    ``rules`` and ``open_methods`` default to this module's tables; ``log_interval`` rate-limits
    denial logs per peer host and method; ``clock`` and ``now`` are for tests.
    """

    def __init__(
        self,
        *,
        tokens: TokenFile | None = None,
        revoked: Revocations | None = None,
        rules: Mapping[str, frozenset[Role]] = RULES,
        open_methods: frozenset[str] = OPEN_METHODS,
        log_interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.tokens = tokens
        self.revoked = revoked
        self.rules = rules
        self.open_methods = open_methods
        self._now = now
        self._certs: OrderedDict[bytes, _Certified | Denial] = OrderedDict()
        self._denials = Throttle(interval=log_interval, clock=clock)

    # -- deciding (pure but for the watched files) ----------------------------------------------

    def decide(
        self,
        method: str,
        auth_context: Mapping[str, Iterable[bytes]],
        metadata: Iterable[tuple[str, str | bytes]],
    ) -> Identity | Denial | None:
        """The caller's identity if it may call ``method``, None for an open method, else why
        not."""
        if method in self.open_methods:
            return None
        identity = self.authenticate(auth_context, metadata)
        if isinstance(identity, Denial):
            return identity
        return self.authorize(method, identity) or identity

    def authenticate(
        self,
        auth_context: Mapping[str, Iterable[bytes]],
        metadata: Iterable[tuple[str, str | bytes]],
    ) -> Identity | Denial:
        """Who the caller is: its verified certificate's identity, else its token's."""
        tls = b"ssl" in _values(auth_context, "transport_security_type")
        pems = _values(auth_context, "x509_pem_cert")
        if tls and pems:
            certified = self._certified(pems[0])
            if isinstance(certified, Denial):
                return certified
            if self._now() > certified.not_after:
                return Denial(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the certificate of {certified.identity} expired at "
                    f"{certified.not_after:%Y-%m-%d %H:%M:%S} UTC",
                )
            return self._unless_revoked(certified.identity, certified.serial)
        token = bearer_token(metadata)
        if isinstance(token, Denial):
            return token
        if token is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED, CREDENTIALS_REQUIRED)
        if not tls:
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED, "bearer tokens are accepted over TLS only"
            )
        identity = self.tokens.verify(token) if self.tokens is not None else None
        if identity is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return self._unless_revoked(identity, None)

    def authorize(self, method: str, identity: Identity) -> Denial | None:
        """None if ``identity``'s role may call ``method``; else the PERMISSION_DENIED."""
        allowed = self.rules.get(method)
        if allowed is None:
            return Denial(grpc.StatusCode.PERMISSION_DENIED, f"no rule for {method}")
        if identity.role in allowed:
            return None
        needed = " or ".join(role.value for role in Role if role in allowed)
        return Denial(
            grpc.StatusCode.PERMISSION_DENIED, f"{method} needs role {needed}; you are {identity}"
        )

    def _unless_revoked(self, identity: Identity, serial: int | None) -> Identity | Denial:
        reason = self.revoked.reason(identity, serial) if self.revoked is not None else None
        return identity if reason is None else Denial(grpc.StatusCode.UNAUTHENTICATED, reason)

    def _certified(self, pem: bytes) -> _Certified | Denial:
        """The identity in a PEM certificate that the TLS handshake already verified; parsed once
        per certificate (a connection's calls all present the same bytes)."""
        cached = self._certs.get(pem)
        if cached is not None:
            self._certs.move_to_end(pem)
            return cached
        result: _Certified | Denial
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            result = Denial(grpc.StatusCode.UNAUTHENTICATED, "unreadable client certificate")
        else:
            identity = certificate_identity(cert)
            if identity is None:
                result = Denial(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the client certificate carries no amm identity "
                    "(one URI SAN spiffe://amm/<role>/<name>)",
                )
            else:
                result = _Certified(identity, cert.serial_number, cert.not_valid_after_utc)
        self._certs[pem] = result
        if len(self._certs) > _CACHE_SIZE:
            self._certs.popitem(last=False)
        return result

    # -- enforcing ------------------------------------------------------------------------------

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method

        async def guard(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self._guard(method, context)

        return wrap_handler(handler, guard, method)

    async def _guard(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        decision = self.decide(method, context.auth_context(), context.invocation_metadata() or ())
        if isinstance(decision, Denial):
            self._log_denial(method, context.peer(), decision)
            await context.abort(decision.code, decision.message)
        # Each call runs in its own task, so this does not leak into other calls.
        _CALLER.set(decision)

    def _log_denial(self, method: str, peer: str, denial: Denial) -> None:
        """Log a denial, but once per peer host and method per ``log_interval``: a misconfigured
        client retrying in a loop must not flood the log."""
        more = self._denials.admit((client_host(peer), method))
        if more is None:
            return
        held_back = f" ({more} more since the last such line)" if more else ""
        log.warning(
            "denied %s to %s: %s %s%s", method, peer, denial.code.name, denial.message, held_back
        )


Guard = Callable[["grpc.aio.ServicerContext[Any, Any]"], Awaitable[None]]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], guard: Guard, method: str = "?"
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and serializers as ``handler`` whose behaviour awaits
    ``guard(context)`` and then runs the original."""
    kinds: Sequence[tuple[Any, Callable[..., Any], bool]] = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True),
    )
    for behavior, make, response_streaming in kinds:
        if behavior is not None:
            return cast(
                "grpc.RpcMethodHandler[Any, Any]",
                make(
                    _guarded(behavior, guard, response_streaming),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                ),
            )
    raise TypeError(f"{method}: a method handler without a behaviour")


def _guarded(
    behavior: Callable[..., Any], guard: Guard, response_streaming: bool
) -> Callable[..., Any]:
    """``behavior`` behind ``guard``. gRPC aio tells the handler styles apart by the function's
    kind (async generator, coroutine function), so the wrapper has the original's kind.

    A synchronous behaviour (gRPC's generated base methods, which answer UNIMPLEMENTED, such as
    the asyncio health servicer's List) is called inline after the check, where gRPC would use a
    thread: every amm servicer is asyncio, so only such stubs take that path.
    """
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await guard(context)
            responses: AsyncIterator[Any] = behavior(request, context)
            async for response in responses:
                yield response

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await guard(context)
            return await behavior(request, context)

        return call
    if response_streaming:

        async def sync_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await guard(context)
            for response in behavior(request, context):
                yield response

        return sync_stream

    async def sync_call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await guard(context)
        return behavior(request, context)

    return sync_call
