"""The AMM and the agents on TLS: who may register which worker, the flags as an operator types
them, and the servers that refuse to start (plaintext off loopback, unusable certificates)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from amm import AsyncClient
from amm.base.security import Role, Security, mint_token
from amm.base.serving import open_channel
from amm.v1 import control_pb2, control_pb2_grpc
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.waiting import wait_for

SERVICE_READY = "amm-service ready address="
AGENT_READY = "amm-agent ready address="


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Security:
    security = Security.temporary(tmp_path_factory.mktemp("certs"))
    for name in ("w1", "w2"):
        security.issue(Role.AGENT, name)
    return security


@pytest.fixture
async def amm(certs: Security, tmp_path: Path) -> AsyncIterator[AmmServer]:
    async with AmmServer(amm_config(tmp_path, tls=str(certs.directory))) as server:
        yield server


async def register(
    amm: AmmServer, me: Security, address: str, name: str, incarnation: str = "i1"
) -> grpc.StatusCode:
    async with open_channel(amm.address, me) as channel:
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        request = control_pb2.RegisterWorkerRequest(
            address=address, name=name, incarnation=incarnation
        )
        try:
            await stub.RegisterWorker(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def unregister(amm: AmmServer, me: Security, address: str) -> tuple[grpc.StatusCode, str]:
    async with open_channel(amm.address, me) as channel:
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        try:
            await stub.UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=address), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def test_an_agent_registers_only_under_its_certificates_name(
    certs: Security, amm: AmmServer
) -> None:
    w1, w2, shared = (certs.as_identity(n) for n in ("w1", "w2", "agent"))
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await register(amm, w1, "127.0.0.1:7001", "w2") == denied
    assert await register(amm, w1, "127.0.0.1:7001", "") == denied
    assert await register(amm, w1, "127.0.0.1:7001", "w1") == grpc.StatusCode.OK
    # Nor may another agent take its address over, or unregister it.
    assert await register(amm, w2, "127.0.0.1:7001", "w2") == denied
    code, details = await unregister(amm, w2, "127.0.0.1:7001")
    assert code == denied
    assert details.startswith("agent 'w2' may not unregister worker 'w1'"), details
    # A restart of w1 (a new incarnation at its address) is fine.
    assert await register(amm, w1, "127.0.0.1:7001", "w1", incarnation="i2") == grpc.StatusCode.OK
    # The shared identity stands for any agent, named or not.
    assert await register(amm, shared, "127.0.0.1:7002", "anything") == grpc.StatusCode.OK
    assert await register(amm, shared, "127.0.0.1:7003", "") == grpc.StatusCode.OK
    assert await unregister(amm, w1, "127.0.0.1:7001") == (grpc.StatusCode.OK, "")
    async with AsyncClient(amm.address, security=certs) as client:
        listed = {w.address: w.name for w in await client.workers()}
    assert listed == {"127.0.0.1:7002": "anything", "127.0.0.1:7003": "127.0.0.1:7003"}


async def run(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python -m module args`` to its end; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, err.decode()


def error_line(stderr: str, start: str) -> str:
    """The one line of ``stderr`` that starts with ``start``; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    found = [line for line in stderr.splitlines() if line.startswith(start)]
    assert len(found) == 1, stderr
    return found[0]


@pytest.mark.parametrize(
    ("module", "args", "code", "message"),
    [
        (
            "amm_service",
            ["--listen", "0.0.0.0:0", "--state", ":memory:"],
            2,
            "amm service: error: refusing to listen on 0.0.0.0:0 without TLS: pass --tls DIR, "
            "or --insecure",
        ),
        (
            "worker_agent",
            ["--listen", "0.0.0.0:0"],
            1,
            "amm-agent: refusing to listen on 0.0.0.0:0 without TLS",
        ),
        (
            "amm_service",
            ["--listen", "127.0.0.1:0", "--token-listen", "127.0.0.1:0"],
            2,
            "amm service: error: token_listen needs tls",
        ),
        (
            "amm_service",
            ["--listen", "127.0.0.1:0", "--tls", "{certs}", "--tls-identity", "operator"],
            2,
            "amm service: error: {certs}/operator.pem is operator 'operator': the AMM needs an "
            "amm identity",
        ),
        (
            "amm_service",
            ["--listen", "127.0.0.1:0", "--tls", "{certs}/nowhere"],
            2,
            "amm service: error: {certs}/nowhere/ca.pem does not exist",
        ),
        (
            "worker_agent",
            ["--tls", "{certs}", "--tls-identity", "amm"],
            2,
            "python -m worker_agent: error: {certs}/amm.pem is amm 'amm': an agent serves with "
            "an agent identity",
        ),
        (
            "worker_agent",
            ["--tls", "{certs}", "--tls-identity", "w9"],
            2,
            "python -m worker_agent: error: {certs}/w9.pem does not exist",
        ),
    ],
)
async def test_servers_that_may_not_start_say_why_in_one_line(
    certs: Security, module: str, args: list[str], code: int, message: str
) -> None:
    d = str(certs.directory)
    exit_code, stderr = await run(module, *(a.format(certs=d) for a in args))
    assert exit_code == code, stderr
    error_line(stderr, message.format(certs=d))


class Server:
    """A server process that printed its ready line; stopped with SIGTERM on exit."""

    def __init__(self, process: asyncio.subprocess.Process, ready: str) -> None:
        self.process = process
        self.fields = dict(f.split("=", 1) for f in ready.split() if "=" in f)

    @property
    def address(self) -> str:
        return self.fields["address"]


async def start(module: str, args: Sequence[str], ready: str) -> Server:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # The children must not read a developer's own AMM_TLS.
        env={k: v for k, v in os.environ.items() if not k.startswith("AMM_")},
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    if not line.startswith(ready):
        process.kill()
        _, err = await process.communicate()
        pytest.fail(f"{module} did not start: {line!r} {err.decode()}")
    return Server(process, line)


async def stop(*servers: Server) -> None:
    for server in servers:
        if server.process.returncode is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        assert await asyncio.wait_for(server.process.wait(), 10) == 0


async def test_processes_with_the_flags_an_operator_types(certs: Security) -> None:
    """``--tls DIR`` on both, a token port on the AMM, agents named by their certificates."""
    d = str(certs.directory)
    amm = await start(
        "amm_service",
        [
            "--listen",
            "127.0.0.1:0",
            "--state",
            ":memory:",
            "--tls",
            d,
            "--token-listen",
            "127.0.0.1:0",
        ],
        SERVICE_READY,
    )
    agents: list[Server] = []
    try:
        assert "token_address" in amm.fields
        # A named certificate picked by --name, one by --tls-identity, and the shared one.
        for args in (["--name", "w1"], ["--tls-identity", "w2"], []):
            agents.append(
                await start(
                    "worker_agent",
                    ["--amm", amm.address, "--listen", "127.0.0.1:0", "--tls", d, *args],
                    AGENT_READY,
                )
            )
        async with AsyncClient(amm.address, security=certs.as_identity("reader")) as client:
            names = await wait_for(
                lambda: client.workers(),
                lambda ws: len(ws) == 3,
                what="three agents registered over TLS",
            )
        by_address = {w.address: w.name for w in names}
        assert [by_address[a.address] for a in agents] == ["w1", "w2", agents[2].address]
        token = mint_token(certs.directory / "tokens", Role.READER, "ci")
        reader = Security.from_dir(d, identity=None, token=token)
        async with AsyncClient(amm.fields["token_address"], security=reader) as client:
            assert len(await client.workers()) == 3
    finally:
        await stop(*agents, amm)


async def test_insecure_allows_plaintext_on_every_interface() -> None:
    amm = await start(
        "amm_service", ["--listen", "0.0.0.0:0", "--state", ":memory:", "--insecure"], SERVICE_READY
    )
    try:
        address = amm.address.replace("0.0.0.0", "127.0.0.1")
        async with AsyncClient(address, timeout=5) as client:
            assert await client.amm.running() is False
    finally:
        await stop(amm)
