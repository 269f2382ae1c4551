"""The cluster CA on disk: what init and issue write, and what they refuse."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from amm.base.security import CertificateAuthority, Identity, Role, SecurityError, init_directory
from amm.base.security.certs import certificate_identity, load_certificate


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("certs") / "certs"
    init_directory(path, sans=["10.0.0.7", "amm.example"], days=30)
    return path


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)) | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_init_writes_the_ca_and_four_identities_with_private_keys(folder: Path) -> None:
    names = {"ca", "amm", "agent", "operator", "reader"}
    assert {p.name for p in folder.iterdir()} == {
        *(f"{n}.pem" for n in names),
        *(f"{n}-key.pem" for n in names),
    }
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in names:
        assert stat.S_IMODE((folder / f"{name}-key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / f"{name}.pem").stat().st_mode) == 0o644


def test_every_certificate_is_signed_by_the_ca_and_names_its_identity(folder: Path) -> None:
    ca = load_certificate(folder / "ca.pem")
    for role in Role:
        cert = load_certificate(folder / f"{role.value}.pem")
        cert.verify_directly_issued_by(ca)
        assert certificate_identity(cert) == Identity(Role(role), role.value)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=6)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_serving_certificates_carry_addresses_and_client_ones_do_not(folder: Path) -> None:
    for name in ("amm", "agent"):
        cert = load_certificate(folder / f"{name}.pem")
        assert sans(cert) == {
            "localhost",
            "127.0.0.1",
            "::1",
            "10.0.0.7",
            "amm.example",
            f"{name}.{name}.amm",
            f"{name}.amm",  # the role's name: any server of this role (expect_role)
        }
        assert usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for name in ("operator", "reader"):
        cert = load_certificate(folder / f"{name}.pem")
        assert sans(cert) == set()
        assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_init_never_replaces_a_ca(folder: Path) -> None:
    before = (folder / "ca.pem").read_bytes()
    with pytest.raises(SecurityError, match="already holds a CA"):
        init_directory(folder)
    assert (folder / "ca.pem").read_bytes() == before


def test_reissuing_rotates_the_key_and_serial(tmp_path: Path) -> None:
    init_directory(tmp_path)
    ca = CertificateAuthority(tmp_path)
    first = ca.issue(Identity(Role.AGENT, "w7"), sans=["10.0.0.7"])
    key = first.key.read_bytes()
    second = ca.issue(Identity(Role.AGENT, "w7"), sans=["w7.example"])
    assert second.serial != first.serial
    assert second.key.read_bytes() != key
    cert = load_certificate(second.cert)
    assert "w7.example" in sans(cert)
    assert "10.0.0.7" not in sans(cert)


def test_issue_refuses_what_would_be_wrong(tmp_path: Path) -> None:
    init_directory(tmp_path)
    ca = CertificateAuthority(tmp_path)
    with pytest.raises(SecurityError, match="names are unique"):
        ca.issue(Identity(Role.READER, "agent"))
    with pytest.raises(SecurityError, match="--san is for certificates that serve"):
        ca.issue(Identity(Role.OPERATOR, "ops"), sans=["host"])
    with pytest.raises(SecurityError, match="invalid SAN"):
        ca.issue(Identity(Role.AGENT, "w1"), sans=["http://x"])
    with pytest.raises(SecurityError, match="cannot outlive"):
        ca.issue(Identity(Role.AGENT, "w1"), days=20 * 365)
    with pytest.raises(SecurityError, match="at least 1"):
        ca.issue(Identity(Role.AGENT, "w1"), days=0)
    with pytest.raises(SecurityError, match="invalid identity name"):
        ca.issue(Identity(Role.AGENT, "W1"))
    assert not (tmp_path / "w1.pem").exists()


def test_ipv6_and_bracketed_sans(tmp_path: Path) -> None:
    init_directory(tmp_path)
    issued = CertificateAuthority(tmp_path).issue(Identity(Role.AGENT, "w1"), sans=["[fd00::7]"])
    ext = load_certificate(issued.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert ipaddress.ip_address("fd00::7") in ext.value.get_values_for_type(x509.IPAddress)


def test_issuing_needs_the_ca_key(tmp_path: Path) -> None:
    init_directory(tmp_path)
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(SecurityError, match="certificates are issued where the CA's key is"):
        CertificateAuthority(tmp_path)


def test_a_certificate_with_two_identities_has_none(tmp_path: Path) -> None:
    init_directory(tmp_path)
    ca = CertificateAuthority(tmp_path)
    issued = ca.issue(Identity(Role.AGENT, "double"))
    cert = load_certificate(issued.cert)
    # Re-sign the same certificate with a second amm URI SAN: ambiguous, so no identity.
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://amm/agent/double"),
                    x509.UniformResourceIdentifier("spiffe://amm/amm/double"),
                ]
            ),
            critical=False,
        )
    )
    assert certificate_identity(builder.sign(ca.key, hashes.SHA256())) is None
