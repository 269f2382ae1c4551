"""Files that change under a running server: rotated certificates, revocations, new tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from amm.base.security import CertificateAuthority, Identity, Role, Security, revoke
from amm.base.security.files import write_atomic
from amm.base.security.tokens import mint_token
from tests.support.security import channel, guarded_server, running

ROTATED = "rotated.example"


async def test_a_reissued_server_certificate_serves_new_connections_without_restart(
    tmp_path: Path,
) -> None:
    folder = Security.temporary(tmp_path)
    # Dialling 127.0.0.1 but checking the name ROTATED tells which certificate the server shows.
    expect_rotated = [("grpc.ssl_target_name_override", ROTATED)]
    async with guarded_server(folder) as server:
        async with channel(server.mtls, folder, expect_rotated) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with channel(server.mtls, folder) as before:
            assert await running(before) == b"operator operator certificate"
            CertificateAuthority(tmp_path).issue(Identity(Role.AMM, "amm"), sans=[ROTATED])
            async with channel(server.mtls, folder, expect_rotated) as after:
                assert await running(after) == b"operator operator certificate"
            # The connection made before the rotation goes on with its session.
            assert await running(before) == b"operator operator certificate"


async def test_a_half_written_rotation_keeps_the_old_certificate(tmp_path: Path) -> None:
    folder = Security.temporary(tmp_path)
    amm_key = tmp_path / "amm-key.pem"
    async with guarded_server(folder) as server:
        good_key = amm_key.read_bytes()
        # A new key whose certificate has not been written yet: the pair does not match.
        other = Security.temporary(tmp_path / "elsewhere")
        assert other.key is not None
        # Replaced, as every writer of this package does (a new inode: a change for sure).
        write_atomic(amm_key, other.key.read_bytes(), 0o600)
        async with channel(server.mtls, folder) as ch:
            assert await running(ch) == b"operator operator certificate"
        write_atomic(amm_key, good_key, 0o600)
        async with channel(server.mtls, folder) as ch:
            assert await running(ch) == b"operator operator certificate"


async def test_a_new_ca_is_trusted_without_restart(tmp_path: Path) -> None:
    """Replacing the CA (after a compromise): the server now verifies callers against the new
    one, so certificates of the old CA stop working for new connections."""
    folder = Security.temporary(tmp_path / "certs")
    successor = Security.temporary(tmp_path / "successor")
    async with guarded_server(folder) as server:
        for name in ("ca.pem", "amm.pem", "amm-key.pem"):
            write_atomic(folder.directory / name, (successor.directory / name).read_bytes())
        async with channel(server.mtls, successor) as ch:
            assert await running(ch) == b"operator operator certificate"
        old_operator = Security(ca=successor.ca, cert=folder.cert, key=folder.key)
        async with channel(server.mtls, old_operator) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_revoking_a_name_stops_it_at_its_next_call(tmp_path: Path) -> None:
    folder = Security.temporary(tmp_path)
    reader = folder.as_identity("reader")
    async with (
        guarded_server(folder) as server,
        channel(server.mtls, folder) as operator,
        channel(server.mtls, reader) as other,
    ):
        assert await running(operator) == b"operator operator certificate"
        revoke(tmp_path / "revoked", name="operator")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running(operator)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "identity 'operator' is revoked"
        assert await running(other) == b"reader reader certificate"


async def test_revoking_a_serial_stops_that_certificate_only(tmp_path: Path) -> None:
    folder = Security.temporary(tmp_path)
    ca = CertificateAuthority(tmp_path)
    old = ca.issue(Identity(Role.OPERATOR, "ops"))
    old_security = Security(ca=folder.ca, cert=tmp_path / "old.pem", key=tmp_path / "old-key.pem")
    assert old_security.cert is not None
    assert old_security.key is not None
    old_security.cert.write_bytes(old.cert.read_bytes())
    old_security.key.write_bytes(old.key.read_bytes())
    ca.issue(Identity(Role.OPERATOR, "ops"))  # the re-issue that replaces it
    revoke(tmp_path / "revoked", serial=old.serial)
    async with guarded_server(folder) as server:
        async with channel(server.mtls, old_security) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == f"certificate serial {old.serial:x} is revoked"
        async with channel(server.mtls, folder.as_identity("ops")) as ch:
            assert await running(ch) == b"operator ops certificate"


async def test_tokens_minted_or_removed_while_serving(tmp_path: Path) -> None:
    folder = Security.temporary(tmp_path)
    tokens = tmp_path / "tokens"
    async with guarded_server(folder) as server:
        minted = mint_token(tokens, Role.READER, "late")
        me = folder.as_identity(None).with_token(minted)
        async with channel(server.tokens, me) as ch:
            assert await running(ch) == b"reader late token"
            write_atomic(tokens, b"# emptied\n", 0o600)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await running(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
