"""A cluster CA in a folder, and the identities it issues next to it.

The folder holds ``ca.pem`` (the CA certificate, given to everyone), ``ca-key.pem`` (its key,
0600, kept where certificates are issued), and per identity ``<name>.pem`` and ``<name>-key.pem``
(0600). Keys are EC P-256: as strong as RSA-3072 for TLS and generated in a millisecond, which
keeps ``init`` and the tests fast. Every certificate carries its identity's URI SAN
(``spiffe://amm/<role>/<name>``); certificates of the serving roles (amm, agent) also carry DNS
and IP SANs, ``localhost``, ``127.0.0.1`` and ``::1`` plus the caller's ``sans``,
``Identity.server_name`` (``w7.agent.amm``) and ``Role.server_name`` (``agent.amm``), and may
serve as well as dial (both extended key usages); readers and operators only dial.

Issuing again under the same name replaces the files atomically, key first: that is how a
certificate is rotated, and servers pick it up on their next handshake.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amm.base.security.errors import SecurityError
from amm.base.security.files import write_atomic
from amm.base.security.identity import Identity, Role, check_name, parse_uri
from amm.base.security.revocation import REVOKED_FILE
from amm.base.security.tokens import TOKENS_FILE

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
else:  # imported when first used: see ``lazy``
    from amm.base.security.lazy import Lazy

    x509 = Lazy("cryptography.x509")
    hashes = Lazy("cryptography.hazmat.primitives.hashes")
    serialization = Lazy("cryptography.hazmat.primitives.serialization")
    ec = Lazy("cryptography.hazmat.primitives.asymmetric.ec")
    ExtendedKeyUsageOID = Lazy("cryptography.x509.oid", "ExtendedKeyUsageOID")
    NameOID = Lazy("cryptography.x509.oid", "NameOID")

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CA_DAYS = 3650
LEAF_DAYS = 365
#: Names and addresses every serving certificate answers to, so local clusters need no --san.
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
#: What ``amm certs init`` issues: the AMM, a shared agent identity, an operator and a reader.
DEFAULT_IDENTITIES = (
    Identity(Role.AMM, "amm"),
    Identity(Role.AGENT, "agent"),
    Identity(Role.OPERATOR, "operator"),
    Identity(Role.READER, "reader"),
)
#: Tolerance for clocks that are slightly behind the issuer's.
_BACKDATE = dt.timedelta(minutes=5)


def cert_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.pem"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}-key.pem"


@dataclass(frozen=True, slots=True)
class Issued:
    """The files of one issued identity."""

    identity: Identity
    cert: Path
    key: Path
    serial: int
    not_after: dt.datetime


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san.strip("[]")))
    except ValueError:
        pass
    if not san or any(c.isspace() for c in san) or "/" in san or ":" in san:
        raise SecurityError(f"invalid SAN {san!r}: expected a DNS name or an IP address")
    return x509.DNSName(san.lower())


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise SecurityError(f"{path} does not exist") from None
    except ValueError as err:
        raise SecurityError(f"{path} is not a PEM certificate: {err}") from None


def certificate_identity(cert: x509.Certificate) -> Identity | None:
    """The amm identity in a certificate's URI SANs; None when there is none, or more than one
    (which no amm CA issues, and which must not be resolved by guessing)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = {
        ident
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if (ident := parse_uri(uri)) is not None
    }
    return found.pop() if len(found) == 1 else None


class CertificateAuthority:
    """The CA of one cluster, in ``directory``; ``create`` makes one, the constructor loads it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.cert = load_certificate(self.directory / CA_CERT)
        key_file = self.directory / CA_KEY
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except FileNotFoundError:
            raise SecurityError(
                f"{key_file} does not exist: certificates are issued where the CA's key is"
            ) from None
        except (ValueError, TypeError) as err:
            raise SecurityError(f"{key_file} is not an unencrypted PEM key: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError(f"{key_file}: expected an EC key, got {type(key).__name__}")
        self.key = key

    @classmethod
    def create(
        cls, directory: Path, *, days: int = CA_DAYS, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        """A new CA in ``directory`` (created 0700 if need be); never replaces an existing one,
        since that would orphan every certificate it issued."""
        directory = Path(directory)
        if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
            raise SecurityError(
                f"{directory} already holds a CA ({CA_CERT}); issue identities with "
                "`amm certs issue`, or pick an empty folder"
            )
        _check_days(days)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = now or dt.datetime.now(dt.UTC)
        key = _new_key()
        # A random suffix tells two clusters' CAs apart in any tool that shows the issuer.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "amm"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"amm cluster CA {secrets.token_hex(4)}"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_atomic(directory / CA_KEY, _key_pem(key), 0o600)
        write_atomic(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory)

    def issue(
        self,
        identity: Identity,
        *,
        sans: Sequence[str] = (),
        days: int = LEAF_DAYS,
        now: dt.datetime | None = None,
    ) -> Issued:
        """Issue ``identity`` a key and certificate in the CA's folder, replacing its old ones.

        ``sans`` (DNS names or IPs) add to ``DEFAULT_SANS`` and are only for the serving roles.
        Refuses a name already held by another role (names are unique in a cluster) and a
        validity that would outlast the CA.
        """
        check_name(identity.name)
        _check_days(days)
        if sans and not identity.role.serves:
            raise SecurityError(
                f"--san is for certificates that serve (amm, agent), not {identity.role.value}"
            )
        cert_file = cert_path(self.directory, identity.name)
        if cert_file.exists():
            held = certificate_identity(load_certificate(cert_file))
            if held is not None and held.role is not identity.role:
                raise SecurityError(
                    f"{cert_file} holds {held}; names are unique in a cluster, pick another"
                )
        now = now or dt.datetime.now(dt.UTC)
        not_after = now + dt.timedelta(days=days)
        if not_after > self.cert.not_valid_after_utc:
            raise SecurityError(
                f"the CA expires on {self.cert.not_valid_after_utc:%Y-%m-%d}: a certificate "
                f"cannot outlive it; ask for fewer --days"
            )
        key = _new_key()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.role.serves:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            names.extend(_unique(_general_name(s) for s in (*DEFAULT_SANS, *sans)))
            names.append(x509.DNSName(identity.server_name))
            names.append(x509.DNSName(identity.role.server_name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "amm"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        key_file = key_path(self.directory, identity.name)
        # Key first: a server that reloads between the two writes sees a mismatched pair, which
        # credentials.py refuses and retries, rather than a new certificate with an old key.
        write_atomic(key_file, _key_pem(key), 0o600)
        write_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return Issued(identity, cert_file, key_file, cert.serial_number, not_after)


def init_directory(
    directory: Path, *, sans: Sequence[str] = (), days: int = LEAF_DAYS
) -> list[Issued]:
    """``amm certs init``: a new CA in ``directory`` and the ``DEFAULT_IDENTITIES``; ``sans`` go
    into the serving ones (amm, agent)."""
    for san in sans:
        _general_name(san)  # fail before anything is written
    ca = CertificateAuthority.create(directory, days=max(CA_DAYS, days + 1))
    return [
        ca.issue(ident, sans=sans if ident.role.serves else (), days=days)
        for ident in DEFAULT_IDENTITIES
    ]


def publish(
    directory: Path,
    dest: Path,
    roles: Iterable[Role],
    *,
    owner: tuple[int, int] | None = None,
) -> list[Path]:
    """Copy what servers or clients of ``roles`` need from the certs folder ``directory`` into
    ``dest``: the CA certificate, the token and revocation lists, and the certificate and key of
    every identity of those roles; never the CA's key, nor other roles' keys. Each file is
    replaced atomically with its mode (and ``owner``), so running servers pick the new ones up
    as they do any rotation. Returns the files written."""
    wanted = frozenset(roles)
    ca = directory / CA_CERT
    load_certificate(ca)  # fails clearly when this is no certs folder
    lists = (directory / name for name in (TOKENS_FILE, REVOKED_FILE))
    files = [ca, *(path for path in lists if path.is_file())]
    for cert in sorted(directory.glob("*.pem")):
        if cert.name in (CA_CERT, CA_KEY) or cert.name.endswith("-key.pem"):
            continue
        identity = certificate_identity(load_certificate(cert))
        if identity is not None and identity.role in wanted:
            files += [cert, key_path(directory, identity.name)]
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for source in files:
        mode = source.stat().st_mode & 0o777
        write_atomic(dest / source.name, source.read_bytes(), mode, owner)
        written.append(dest / source.name)
    return written


def _check_days(days: int) -> None:
    if days < 1:
        raise SecurityError(f"--days must be at least 1, got {days}")


def _unique(names: Iterable[x509.GeneralName]) -> list[x509.GeneralName]:
    seen: list[x509.GeneralName] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen
