"""``Security``: finding the files, the environment variables, and refusing what cannot work."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest

from amm.base.security import Identity, Role, Security, SecurityError, read_token
from amm.base.security.credentials import expect_role, expect_server


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Security:
    return Security.temporary(tmp_path_factory.mktemp("certs"))


def test_temporary_makes_a_folder_and_returns_the_operator(folder: Security) -> None:
    d = folder.directory
    assert folder == Security(
        ca=d / "ca.pem",
        cert=d / "operator.pem",
        key=d / "operator-key.pem",
        tokens=d / "tokens",
        revoked=d / "revoked",
    )
    assert folder.identity() == Identity(Role.OPERATOR, "operator")
    assert folder.as_identity("amm").identity() == Identity(Role.AMM, "amm")
    assert folder.as_identity(None).identity() is None
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600


def test_issue_more_identities_there(tmp_path: Path) -> None:
    security = Security.temporary(tmp_path)
    before = security.stamp()
    agents = [security.issue(Role.AGENT, f"w{i}") for i in (1, 2)]
    assert [a.identity() for a in agents] == [
        Identity(Role.AGENT, "w1"),
        Identity(Role.AGENT, "w2"),
    ]
    assert security.stamp() == before
    security.issue(Role.OPERATOR, "operator")  # rotation
    assert security.stamp() != before


def test_from_dir_fails_early_and_clearly(tmp_path: Path, folder: Security) -> None:
    with pytest.raises(SecurityError, match=r"is .* a certs folder"):
        Security.from_dir(tmp_path)
    with pytest.raises(SecurityError, match="no identity 'w9' there"):
        Security.from_dir(folder.directory, "w9")
    with pytest.raises(SecurityError, match="a certificate needs its key"):
        Security(ca=folder.ca, cert=folder.cert)


def test_the_token_never_shows(folder: Security) -> None:
    secret = "do-not-print-me"
    assert secret not in repr(folder.with_token(secret))
    assert secret not in str(folder.with_token(secret))


def test_only_serving_identities_make_server_credentials(folder: Security) -> None:
    assert isinstance(folder.as_identity("amm").server_credentials(), grpc.ServerCredentials)
    assert isinstance(
        folder.as_identity("agent").token_server_credentials(), grpc.ServerCredentials
    )
    with pytest.raises(SecurityError, match="operator 'operator', which cannot serve"):
        folder.server_credentials()
    with pytest.raises(SecurityError, match="needs a certificate"):
        folder.as_identity(None).server_credentials()


def test_channel_credentials_with_and_without_a_token(folder: Security) -> None:
    assert isinstance(folder.channel_credentials(), grpc.ChannelCredentials)
    assert isinstance(folder.with_token("t").channel_credentials(), grpc.ChannelCredentials)
    assert expect_server(Identity(Role.AGENT, "w7")) == [
        ("grpc.ssl_target_name_override", "w7.agent.amm")
    ]
    assert expect_role(Role.AGENT) == [("grpc.ssl_target_name_override", "agent.amm")]


def test_from_env(folder: Security, tmp_path: Path) -> None:
    d = str(folder.directory)
    assert Security.from_env({}) is None
    assert Security.from_env({"AMM_TLS": d}) == folder
    reader = Security.from_env({"AMM_TLS": d, "AMM_IDENTITY": "reader"})
    assert reader is not None
    assert reader.identity() == Identity(Role.READER, "reader")
    anonymous = Security.from_env({"AMM_TLS": d, "AMM_IDENTITY": "", "AMM_TOKEN": "t"})
    assert anonymous is not None
    assert (anonymous.cert, anonymous.token) == (None, "t")
    # A token holder's folder has only ca.pem: no operator certificate is looked for.
    only_ca = tmp_path / "client"
    only_ca.mkdir()
    (only_ca / "ca.pem").write_bytes(folder.ca.read_bytes())
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    holder = Security.from_env({"AMM_TLS": str(only_ca), "AMM_TOKEN_FILE": str(token_file)})
    assert holder is not None
    assert (holder.cert, holder.token) == (None, "from-a-file")
    with pytest.raises(SecurityError, match="operator"):
        Security.from_env({"AMM_TLS": str(only_ca)})


def test_read_token(tmp_path: Path) -> None:
    assert read_token({}) is None
    assert read_token({"AMM_TOKEN": " abc \n"}) == "abc"
    (tmp_path / "t").write_text("fromfile")
    assert read_token({"AMM_TOKEN": "abc", "AMM_TOKEN_FILE": str(tmp_path / "t")}) == "abc"
    assert read_token({"AMM_TOKEN_FILE": str(tmp_path / "t")}) == "fromfile"
    with pytest.raises(SecurityError, match="cannot read AMM_TOKEN_FILE"):
        read_token({"AMM_TOKEN_FILE": str(tmp_path / "missing")})
