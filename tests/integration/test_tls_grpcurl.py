"""The real grpcurl binary against a guarded server, with the README's flags: a certificate of
the cluster CA on the mutual-TLS port, or a bearer token on the token port."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from amm.base.security import Role, Security, mint_token
from tests.support.security import guarded_server

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


async def grpcurl(*args: str) -> tuple[int, str]:
    assert GRPCURL is not None, "grpcurl is installed by the dev extras: make install"
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Security:
    return Security.temporary(tmp_path_factory.mktemp("certs"))


def identity_flags(certs: Security, name: str) -> list[str]:
    d = certs.directory
    cert, key = d / f"{name}.pem", d / f"{name}-key.pem"
    return ["-cacert", str(d / "ca.pem"), "-cert", str(cert), "-key", str(key)]


async def test_list_with_an_operator_certificate(certs: Security) -> None:
    async with guarded_server(certs) as server:
        code, out = await grpcurl(*identity_flags(certs, "operator"), server.mtls, "list")
        assert code == 0, out
        assert {"amm.v1.ActiveMemoryManager", "amm.v1.WorkerAgent"} <= set(out.split())
        code, out = await grpcurl(*identity_flags(certs, "agent"), server.mtls, "list")
        assert code != 0
        assert "PermissionDenied" in out
        assert "needs role reader or operator; you are agent 'agent'" in out
        code, out = await grpcurl("-cacert", str(certs.ca), server.mtls, "list")
        assert code != 0, "no certificate: the handshake fails"


async def test_list_with_a_token(certs: Security) -> None:
    token = mint_token(certs.directory / "tokens", Role.READER, "script")
    async with guarded_server(certs) as server:
        ca = ["-cacert", str(certs.ca)]
        code, out = await grpcurl(
            *ca, "-H", f"authorization: Bearer {token}", server.tokens, "list"
        )
        assert code == 0, out
        assert "amm.v1.ActiveMemoryManager" in out.split()
        code, out = await grpcurl(*ca, server.tokens, "list")
        assert code != 0
        assert "Unauthenticated" in out


async def test_an_agent_by_its_role_whatever_the_address(certs: Security) -> None:
    """Agents are dialled at advertised addresses their certificates do not list: grpcurl checks
    the role's name instead (-servername agent.amm), as the AMM, peers and clients do."""
    async with guarded_server(certs, identity="agent") as server:
        flags = identity_flags(certs, "operator")
        code, out = await grpcurl(*flags, "-servername", "agent.amm", server.mtls, "list")
        assert code == 0, out
        assert "amm.v1.WorkerAgent" in out.split()
        code, out = await grpcurl(*flags, "-servername", "w9.agent.amm", server.mtls, "list")
        assert code != 0, "another name than the certificate's fails the handshake"
