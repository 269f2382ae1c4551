"""The authorizer's decisions, from auth contexts and metadata as gRPC hands them over."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from amm.base.security import (
    Authorizer,
    CertificateAuthority,
    Denial,
    Identity,
    Revocations,
    Role,
    TokenFile,
    init_directory,
    mint_token,
)
from amm.base.security.authz import CREDENTIALS_REQUIRED, bearer_token

START = "/amm.v1.ActiveMemoryManager/Start"
RUNNING = "/amm.v1.ActiveMemoryManager/Running"
WHO_HAS = "/amm.v1.ActiveMemoryManager/WhoHas"
CHECK = "/grpc.health.v1.Health/Check"
TLS = {"transport_security_type": [b"ssl"]}
PLAIN = {"transport_security_type": [b"insecure"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("certs")
    init_directory(path)
    return path


def peer_cert(folder: Path, name: str) -> dict[str, list[bytes]]:
    """The auth context of a mutual-TLS connection whose client presented ``name``'s cert."""
    return {**TLS, "x509_pem_cert": [(folder / f"{name}.pem").read_bytes()]}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {token}")]


def test_open_methods_need_nothing(folder: Path) -> None:
    assert Authorizer().decide(CHECK, {}, []) is None


def test_certificate_identities(folder: Path) -> None:
    authorizer = Authorizer()
    assert authorizer.decide(RUNNING, peer_cert(folder, "reader"), []) == Identity(
        Role.READER, "reader"
    )
    assert authorizer.decide(START, peer_cert(folder, "operator"), []) == Identity(
        Role.OPERATOR, "operator"
    )
    assert authorizer.decide(WHO_HAS, peer_cert(folder, "amm"), []) == Denial(
        grpc.StatusCode.PERMISSION_DENIED,
        f"{WHO_HAS} needs role reader or operator; you are amm 'amm'",
    )


def test_no_credentials(folder: Path) -> None:
    assert Authorizer().decide(RUNNING, TLS, []) == Denial(
        grpc.StatusCode.UNAUTHENTICATED, CREDENTIALS_REQUIRED
    )


def test_unknown_method_after_authentication(folder: Path) -> None:
    authorizer = Authorizer()
    assert authorizer.decide("/x.Y/Z", TLS, []) == Denial(
        grpc.StatusCode.UNAUTHENTICATED, CREDENTIALS_REQUIRED
    )
    assert authorizer.decide("/x.Y/Z", peer_cert(folder, "operator"), []) == Denial(
        grpc.StatusCode.PERMISSION_DENIED, "no rule for /x.Y/Z"
    )


def test_a_certificate_that_expired_since_the_handshake(folder: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    decision = Authorizer(now=lambda: later).decide(RUNNING, peer_cert(folder, "reader"), [])
    assert isinstance(decision, Denial)
    assert decision.code == grpc.StatusCode.UNAUTHENTICATED
    assert decision.message.startswith("the certificate of reader 'reader' expired at ")


def test_a_certificate_of_the_ca_without_an_identity(folder: Path) -> None:
    # Not something amm issues, but the CA key could sign anything: no URI SAN, no identity.
    ca = CertificateAuthority(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    decision = Authorizer().decide(RUNNING, {**TLS, "x509_pem_cert": [pem]}, [])
    assert decision == Denial(
        grpc.StatusCode.UNAUTHENTICATED,
        "the client certificate carries no amm identity (one URI SAN spiffe://amm/<role>/<name>)",
    )


def test_tokens(tmp_path: Path) -> None:
    token = mint_token(tmp_path / "tokens", Role.READER, "dash")
    authorizer = Authorizer(tokens=TokenFile(tmp_path / "tokens"))
    assert authorizer.decide(RUNNING, TLS, bearer(token)) == Identity(
        Role.READER, "dash", via="token"
    )
    assert authorizer.decide(START, TLS, bearer(token)) == Denial(
        grpc.StatusCode.PERMISSION_DENIED, f"{START} needs role operator; you are reader 'dash'"
    )
    assert authorizer.decide(RUNNING, TLS, bearer("nope")) == Denial(
        grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
    )
    assert authorizer.decide(RUNNING, PLAIN, bearer(token)) == Denial(
        grpc.StatusCode.UNAUTHENTICATED, "bearer tokens are accepted over TLS only"
    )
    assert Authorizer().decide(RUNNING, TLS, bearer(token)) == Denial(
        grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([], None),
        ([("authorization", "Bearer abc")], "abc"),
        ([("authorization", "bearer  abc ")], "abc"),
        ([("authorization", b"Bearer abc")], "abc"),
        ([("authorization", "Basic dXNlcg==")], Denial),
        ([("authorization", "Bearer")], Denial),
    ],
)
def test_bearer_header(metadata: list[tuple[str, str | bytes]], expected: object) -> None:
    found = bearer_token(metadata)
    if expected is Denial:
        assert isinstance(found, Denial)
        assert found.code == grpc.StatusCode.UNAUTHENTICATED
    else:
        assert found == expected


def test_revoked_names_fail_for_certificates_and_tokens(folder: Path, tmp_path: Path) -> None:
    token = mint_token(tmp_path / "tokens", Role.OPERATOR, "reader")
    (tmp_path / "revoked").write_text("reader\n")
    authorizer = Authorizer(
        tokens=TokenFile(tmp_path / "tokens"), revoked=Revocations(tmp_path / "revoked")
    )
    revoked = Denial(grpc.StatusCode.UNAUTHENTICATED, "identity 'reader' is revoked")
    assert authorizer.decide(RUNNING, peer_cert(folder, "reader"), []) == revoked
    assert authorizer.decide(RUNNING, TLS, bearer(token)) == revoked
    assert isinstance(authorizer.decide(RUNNING, peer_cert(folder, "operator"), []), Identity)


class _Context:
    """Just what the guard uses of a ``grpc.aio.ServicerContext``."""

    def __init__(self, peer: str, metadata: list[tuple[str, str]]) -> None:
        self._peer, self._metadata = peer, metadata
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return dict(TLS)

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


async def test_denials_are_logged_once_per_peer_and_method_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    authorizer = Authorizer(log_interval=60.0, clock=lambda: clock[0])
    secret = "s3cr3t-t0ken-that-must-not-be-logged"

    async def attempt(peer: str, method: str = RUNNING) -> _Context:
        context = _Context(peer, bearer(secret))
        with pytest.raises(RuntimeError, match="aborted"):
            await authorizer._guard(method, context)  # type: ignore[arg-type]
        return context

    with caplog.at_level(logging.WARNING, logger="amm.base.security.authz"):
        first = await attempt("ipv4:10.0.0.9:40001")
        await attempt("ipv4:10.0.0.9:40002")  # same host, another connection
        await attempt("ipv4:10.0.0.9:40003", START)  # another method
        await attempt("ipv4:10.0.0.8:40001")  # another host
        clock[0] = 61.0
        await attempt("ipv4:10.0.0.9:40004")
    assert first.aborted == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
    assert len(caplog.records) == 4
    assert secret not in caplog.text
    assert "denied /amm.v1.ActiveMemoryManager/Running to ipv4:10.0.0.9:40001" in caplog.text
