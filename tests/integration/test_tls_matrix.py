"""Every RPC of a real AMM and a real agent, both on TLS, called by every kind of caller.

The AMM (with a token port) and one agent registered with it run in-process on 127.0.0.1:0 with
their real servicers. Each RPC of their services, read from the proto descriptors (plus health
and reflection), is called with an empty request by each caller; a streaming one sends one empty
message and reads one answer. What must come back:

- a caller the rule table (``RULES``) allows: anything but UNAUTHENTICATED or PERMISSION_DENIED
  (an empty request may well be INVALID_ARGUMENT or NOT_FOUND);
- a caller of another role: PERMISSION_DENIED naming the role needed;
- no certificate, another CA's, an expired one, or a token alone on a mutual-TLS port: the
  handshake fails, UNAVAILABLE;
- nothing (or a certificate, which that port does not ask for) on the token port:
  UNAUTHENTICATED, but for the open health checks.

Expectations come from ``RULES``; ``test_every_rpc_has_a_rule`` makes a new RPC without a rule
fail here (the authorizer would refuse it anyway, closed by default).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from amm.base.security import RULES, CertificateAuthority, Identity, Role, Security, mint_token
from amm.base.security.authz import OPEN_METHODS
from amm.base.serving import open_channel
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.agent import put
from tests.support.security import CORE_INTERNAL
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig

CALL_DEADLINE = 5.0

CONTROL = control_pb2.DESCRIPTOR.services_by_name["ActiveMemoryManager"]
AGENT = agent_pb2.DESCRIPTOR.services_by_name["WorkerAgent"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


@dataclass(frozen=True)
class Rpc:
    name: str  # /package.Service/Method
    client_streaming: bool
    server_streaming: bool


def rpcs(*services: ServiceDescriptor) -> list[Rpc]:
    return [
        Rpc(f"/{s.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for s in services
        for m in s.methods
    ]


AMM_RPCS = rpcs(CONTROL, HEALTH, REFLECTION)
AGENT_RPCS = rpcs(AGENT, HEALTH, REFLECTION)


@dataclass(frozen=True)
class Caller:
    """Who calls, with what, on which port: ``role`` None for a caller that cannot be
    authenticated there; ``handshake`` False when the mutual-TLS handshake must fail."""

    label: str
    security: Security
    token_port: bool = False
    role: Role | None = None
    handshake: bool = True


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Security:
    folder = tmp_path_factory.mktemp("certs")
    security = Security.temporary(folder)
    security.issue(Role.AGENT, "w1")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    CertificateAuthority(folder).issue(Identity(Role.OPERATOR, "stale"), days=1, now=long_ago)
    for role in (Role.READER, Role.OPERATOR):
        token = mint_token(folder / "tokens", role, f"{role.value}-token")
        (folder / f"{role.value}.token").write_text(token)
    return security


def callers(certs: Security, stranger: Security) -> list[Caller]:
    anonymous = certs.as_identity(None)

    def token(role: Role) -> Security:
        return anonymous.with_token((certs.directory / f"{role.value}.token").read_text())

    return [
        Caller("no certificate", anonymous, handshake=False),
        Caller("another CA", stranger, handshake=False),
        Caller("expired", certs.as_identity("stale"), handshake=False),
        Caller("reader token, no certificate", token(Role.READER), handshake=False),
        *(Caller(role.value, certs.as_identity(role.value), role=role) for role in Role),
        Caller("nothing, token port", anonymous, token_port=True),
        Caller("operator certificate, token port", certs, token_port=True),
        Caller("reader token", token(Role.READER), token_port=True, role=Role.READER),
        Caller("operator token", token(Role.OPERATOR), token_port=True, role=Role.OPERATOR),
    ]


@dataclass
class Cluster:
    amm: AmmServer
    agent: Agent


@pytest.fixture
async def cluster(certs: Security, tmp_path: Path) -> AsyncIterator[Cluster]:
    config = amm_config(
        tmp_path, tls=str(certs.directory), token_listen="127.0.0.1:0", interval="1h"
    )
    async with AmmServer(config) as amm:
        assert amm.token_address is not None
        # No name: a named certificate's is the one the AMM accepts, and the default.
        agent_config = AgentConfig(amm=amm.address, security=certs.as_identity("w1"), stop_grace=0)
        async with Agent(agent_config) as agent:
            await wait_for(lambda: agent.registered, what="the agent's registration over TLS")
            assert agent.node.name == "w1"
            # A key held: Close is then refused, not obeyed, and the agent lives through the walk.
            async with open_channel(agent.address, certs, expect=Role.AGENT) as channel:
                await put(agent_pb2_grpc.WorkerAgentStub(channel), "held", b"x")
            yield Cluster(amm, agent)


async def call(channel: grpc.aio.Channel, rpc: Rpc) -> tuple[grpc.StatusCode, str]:
    """Call ``rpc`` with one empty message; the status and details it ends with (OK when a
    first answer arrived or the call completed). A request stream whose message lost the race
    with the server's refusal is called again (see ``tests.support.security.invoke``)."""
    for _ in range(2):
        code, details = await _call_once(channel, rpc)
        if not (
            rpc.client_streaming and (code, details) == (grpc.StatusCode.INTERNAL, CORE_INTERNAL)
        ):
            return code, details
    return await _call_once(channel, rpc)


async def _call_once(channel: grpc.aio.Channel, rpc: Rpc) -> tuple[grpc.StatusCode, str]:
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if rpc.client_streaming and rpc.server_streaming:
            bidi = channel.stream_stream(rpc.name, **raw)(iter([b""]), timeout=CALL_DEADLINE)
            async for _ in bidi:
                bidi.cancel()
                break
        elif rpc.client_streaming:
            await channel.stream_unary(rpc.name, **raw)(iter([b""]), timeout=CALL_DEADLINE)
        elif rpc.server_streaming:
            stream = channel.unary_stream(rpc.name, **raw)(b"", timeout=CALL_DEADLINE)
            async for _ in stream:
                stream.cancel()
                break
        else:
            await channel.unary_unary(rpc.name, **raw)(b"", timeout=CALL_DEADLINE)
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.CANCELLED:  # our own cancel after the first answer
            return grpc.StatusCode.OK, ""
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def expectation(rpc: Rpc, who: Caller) -> str:
    """``allowed``, ``denied``, ``handshake`` or ``unauthenticated``."""
    if not who.handshake:
        return "handshake"
    if rpc.name in OPEN_METHODS:
        return "allowed"
    if who.role is None:
        return "unauthenticated"
    return "allowed" if who.role in RULES[rpc.name] else "denied"


def check(rpc: Rpc, who: Caller, code: grpc.StatusCode, details: str) -> str | None:
    """None when the outcome is the expected one; else what went wrong."""
    expected = expectation(rpc, who)
    seen = f"{rpc.name} by {who.label}: {code.name} {details!r}"
    if expected == "allowed":
        refused = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        return f"allowed, but {seen}" if code in refused else None
    if expected == "denied":
        needed = " or ".join(r.value for r in Role if r in RULES[rpc.name])
        ok = code is grpc.StatusCode.PERMISSION_DENIED and details.startswith(
            f"{rpc.name} needs role {needed}; you are {who.role.value if who.role else '?'} "
        )
        return None if ok else f"denied (needs {needed}), but {seen}"
    wanted = (
        grpc.StatusCode.UNAVAILABLE if expected == "handshake" else grpc.StatusCode.UNAUTHENTICATED
    )
    return None if code is wanted else f"{wanted.name} expected, but {seen}"


def test_every_rpc_has_a_rule() -> None:
    """A new RPC in the protos fails here until RULES says who may call it."""
    for rpc in [*rpcs(CONTROL), *rpcs(AGENT)]:
        assert rpc.name in RULES, f"{rpc.name} has no rule in amm.base.security.RULES"
        assert RULES[rpc.name], f"{rpc.name}: a rule must name at least one role"
    # And no rule is left for an RPC that no longer exists.
    served = {r.name for r in AMM_RPCS + AGENT_RPCS}
    assert {name for name in RULES if name.startswith("/amm.v1.")} <= served


async def test_every_rpc_by_every_caller(certs: Security, cluster: Cluster, tmp_path: Path) -> None:
    stranger = Security.temporary(tmp_path / "stranger")
    failures: list[str] = []
    counts: dict[str, int] = {}
    for who in callers(certs, stranger):
        servers: list[tuple[str, list[Rpc], Role]] = []
        if who.token_port:
            assert cluster.amm.token_address is not None
            servers.append((cluster.amm.token_address, AMM_RPCS, Role.AMM))
        else:
            servers.append((cluster.amm.address, AMM_RPCS, Role.AMM))
            servers.append((cluster.agent.address, AGENT_RPCS, Role.AGENT))
        for address, walk, serving in servers:
            # The AMM is dialled by address (its certificate lists 127.0.0.1), agents by role.
            expect = None if serving is Role.AMM else Role.AGENT
            async with open_channel(address, who.security, expect=expect, options=()) as channel:
                for rpc in walk:
                    code, details = await call(channel, rpc)
                    counts[expectation(rpc, who)] = counts.get(expectation(rpc, who), 0) + 1
                    if (problem := check(rpc, who, code, details)) is not None:
                        failures.append(problem)
    assert not failures, "\n".join(failures)
    # Every kind of outcome was seen, so the walk really covered the table.
    assert set(counts) == {"allowed", "denied", "handshake", "unauthenticated"}, counts
    assert cluster.agent.registered
    assert "held" in cluster.agent.store
