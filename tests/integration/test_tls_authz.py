"""Mutual TLS and roles on a real grpc.aio server (127.0.0.1:0): who gets through, and why not."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from amm.base.security import RULES, CertificateAuthority, Identity, Role, Security, caller
from amm.base.security.authz import CREDENTIALS_REQUIRED
from amm.base.security.tokens import mint_token
from amm.v1 import control_pb2, control_pb2_grpc
from tests.support.security import (
    METHODS,
    UNLISTED,
    channel,
    full_name,
    guarded_server,
    invoke,
    running,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Security:
    """One CA with the default identities, plus an expired operator and two tokens; shared by
    the tests of this module that do not change the folder."""
    folder = tmp_path_factory.mktemp("certs")
    security = Security.temporary(folder)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    CertificateAuthority(folder).issue(Identity(Role.OPERATOR, "stale"), days=1, now=long_ago)
    (folder / "operator-token").write_text(mint_token(folder / "tokens", Role.OPERATOR, "ci"))
    (folder / "reader-token").write_text(mint_token(folder / "tokens", Role.READER, "dash"))
    return security


def token(certs: Security, name: str) -> str:
    return (certs.directory / f"{name}-token").read_text()


def status_of(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> tuple[grpc.StatusCode, str]:
    return err.value.code(), err.value.details() or ""


C = "/amm.v1.ActiveMemoryManager/"
A = "/amm.v1.WorkerAgent/"
#: Issue 9's table, written out again rather than read from RULES: what each role may call.
READS = {
    C + m
    for m in (
        "Running",
        "GetStatus",
        "ListWorkers",
        "WhoHas",
        "HasWhat",
        "ListGoals",
        "ListLost",
        "WatchEvents",
    )
}
ALLOWED = {
    Role.READER: READS,
    Role.OPERATOR: READS
    | {C + m for m in ("Start", "Stop", "RunOnce", "RetireWorkers", "Replicate", "Forget")}
    | {A + m for m in ("Put", "PutMany", "Get", "Pin", "Unpin")},
    # Agents confirm epochs and peers, and look keys up before they store or delete them.
    Role.AGENT: {
        C + m
        for m in (
            "RegisterWorker",
            "UnregisterWorker",
            "DrainWorker",
            "GetMembership",
            "LookupKeys",
        )
    }
    | {A + m for m in ("Fetch", "PromiseKeep", "PromiseKeepBatch")},
    Role.AMM: {A + m for m in ("Poll", "HoldsKeys", "Directives", "Close", "Delete")},
}


@pytest.mark.parametrize("role", list(Role))
async def test_each_role_calls_exactly_what_the_table_allows(certs: Security, role: Role) -> None:
    # init names each default identity after its role: amm, agent, operator, reader.
    me = certs.as_identity(role.value)
    async with guarded_server(certs) as server, channel(server.mtls, me) as ch:
        for service, method, request_streaming, response_streaming in METHODS:
            name = full_name(service, method)
            call = invoke(ch, service, method, request_streaming, response_streaming)
            if name in ALLOWED[role]:
                assert await call == f"{role.value} {role.value} certificate".encode(), name
                continue
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            code, details = status_of(err)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, details)
            assert details.startswith(f"{name} needs role "), details
            assert details.endswith(f"; you are {role.value} '{role.value}'"), details


def test_the_rules_are_the_table() -> None:
    every = {full_name(s, m) for s, m, *_ in METHODS}
    assert {name for name in RULES if name in every} == every, "every amm RPC has a rule"
    for role, allowed in ALLOWED.items():
        assert {name for name in every if role in RULES[name]} == allowed, role


def test_operator_may_do_all_a_reader_may() -> None:
    for roles in RULES.values():
        assert Role.READER not in roles or Role.OPERATOR in roles


async def test_a_method_without_a_rule_fails_closed(certs: Security) -> None:
    async with guarded_server(certs) as server, channel(server.mtls, certs) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await invoke(ch, *UNLISTED)
    assert status_of(err) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "no rule for /amm.v1.Test/Unlisted",
    )


async def test_no_certificate_fails_the_mutual_tls_handshake(certs: Security) -> None:
    anonymous = certs.as_identity(None)
    async with guarded_server(certs) as server, channel(server.mtls, anonymous) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_no_credentials_on_the_token_port_is_unauthenticated(certs: Security) -> None:
    anonymous = certs.as_identity(None)
    async with guarded_server(certs) as server, channel(server.tokens, anonymous) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running(ch)
    assert status_of(err) == (grpc.StatusCode.UNAUTHENTICATED, CREDENTIALS_REQUIRED)


async def test_health_is_open_to_probes_without_credentials(certs: Security) -> None:
    anonymous, reader = certs.as_identity(None), certs.as_identity("reader")
    async with guarded_server(certs) as server, channel(server.tokens, anonymous) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        # List names the services: not open. (The asyncio servicer does not implement it, so a
        # reader gets UNIMPLEMENTED from the generated base method, which runs after the check.)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.List(health_pb2.HealthListRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with guarded_server(certs) as server, channel(server.mtls, reader) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_needs_a_reader(certs: Security) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with guarded_server(certs) as server:
        async with channel(server.mtls, certs.as_identity("reader")) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            answers = [a async for a in stub.ServerReflectionInfo(iter([request]), timeout=10)]
        listed = {s.name for s in answers[0].list_services_response.service}
        assert {"amm.v1.ActiveMemoryManager", "amm.v1.WorkerAgent"} <= listed
        async with channel(server.mtls, certs.as_identity("amm")) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [a async for a in stub.ServerReflectionInfo(iter([request]), timeout=10)]
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_certificate_of_another_ca_fails_the_handshake(
    certs: Security, tmp_path: Path
) -> None:
    stranger = Security.temporary(tmp_path / "other")
    # The stranger trusts our CA, so only its own certificate is wrong.
    confused = Security(ca=certs.ca, cert=stranger.cert, key=stranger.key)
    async with guarded_server(certs) as server:
        for me in (stranger, confused):
            async with channel(server.mtls, me) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await running(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_expired_certificate_is_refused(certs: Security) -> None:
    async with guarded_server(certs) as server:
        async with channel(server.mtls, certs.as_identity("stale")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with channel(server.mtls, certs) as ch:
            assert await running(ch) == b"operator operator certificate"


async def test_tokens_grant_their_role_on_the_token_port(certs: Security) -> None:
    ci = certs.as_identity(None).with_token(token(certs, "operator"))
    dash = certs.as_identity(None).with_token(token(certs, "reader"))
    wrong = certs.as_identity(None).with_token("not-a-token")
    start = ("amm.v1.ActiveMemoryManager", "Start")
    async with guarded_server(certs) as server:
        async with channel(server.tokens, ci) as ch:
            assert await running(ch) == b"operator ci token"
            assert await invoke(ch, *start) == b"operator ci token"
        async with channel(server.tokens, dash) as ch:
            assert await running(ch) == b"reader dash token"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await invoke(ch, *start)
            assert status_of(err) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "/amm.v1.ActiveMemoryManager/Start needs role operator; you are reader 'dash'",
            )
        async with channel(server.tokens, wrong) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running(ch)
            assert status_of(err) == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")


async def test_a_certificate_outranks_a_token(certs: Security) -> None:
    reader_with_operator_token = certs.as_identity("reader").with_token(token(certs, "operator"))
    async with (
        guarded_server(certs) as server,
        channel(server.mtls, reader_with_operator_token) as ch,
    ):
        assert await running(ch) == b"reader reader certificate"


async def test_caller_is_the_identity_of_each_concurrent_call(certs: Security) -> None:
    callers = [certs.as_identity(n) for n in ("reader", "operator")]
    async with guarded_server(certs) as server:
        channels = [channel(server.mtls, me) for me in callers]
        try:
            answers = await asyncio.gather(*(running(ch) for ch in channels * 20))
        finally:
            for ch in channels:
                await ch.close(grace=None)
    assert answers == [b"reader reader certificate", b"operator operator certificate"] * 20


class _Control(control_pb2_grpc.ActiveMemoryManagerServicer):
    """A generated servicer, as the AMM registers its own: protobuf serializers, registered
    methods. Running answers whether the caller is an operator, from ``caller()``."""

    async def Running(
        self, request: control_pb2.RunningRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> control_pb2.RunningResponse:
        identity = caller()
        return control_pb2.RunningResponse(running=identity is not None and identity.name == "op")


async def test_generated_servicers_are_guarded_and_see_the_caller(
    certs: Security, tmp_path: Path
) -> None:
    folder = Security.temporary(tmp_path)
    operator = folder.issue(Role.OPERATOR, "op")
    server = grpc.aio.server(interceptors=[folder.authorizer()])
    control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server(
        _Control(),  # type: ignore[abstract]
        server,
    )
    port = server.add_secure_port("127.0.0.1:0", folder.as_identity("amm").server_credentials())
    await server.start()
    try:
        for me, expected in ((operator, True), (folder.as_identity("reader"), False)):
            async with channel(f"127.0.0.1:{port}", me) as ch:
                stub = control_pb2_grpc.ActiveMemoryManagerStub(ch)
                answer = await stub.Running(control_pb2.RunningRequest(), timeout=10)
                assert answer.running is expected
        async with channel(f"127.0.0.1:{port}", folder.as_identity("agent")) as ch:
            stub = control_pb2_grpc.ActiveMemoryManagerStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Running(control_pb2.RunningRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)
