"""``Security``: the files one process uses to prove who it is and to check who others are.

Like Dask's ``Security``, with roles. ``Security.from_dir("certs/", identity="operator")`` points
at a certs folder (``certs.py``); ``Security.temporary(folder)`` makes a throwaway CA there for
tests and ``amm cluster --tls``. A server takes ``server_credentials()`` for its port and
``authorizer()`` as its interceptor; a client takes ``channel_credentials()``.

Why two kinds of server port: gRPC Python offers a server either no client certificate request
at all or a required, verified one; it cannot ask for one and accept its absence. So the main
port (``server_credentials()``) is mutual TLS: every caller presents a certificate of the cluster
CA, and a caller without one fails the handshake (UNAVAILABLE). Bearer tokens need a port that
asks for no certificate: ``token_server_credentials()``, TLS for the server only, where a token
is the only way in (UNAUTHENTICATED without one). Both ports use the same authorizer.

Rotation: server credentials re-read the CA, certificate and key whenever one of the files
changes (checked at each new handshake), so re-issuing a certificate or replacing the CA needs
no restart; connections already open keep their session. gRPC Python cannot swap a channel's
credentials, so a client that lives long builds a new channel when ``stamp()`` changes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import grpc

from amm.base.security.authz import Authorizer
from amm.base.security.certs import (
    CA_CERT,
    DEFAULT_IDENTITIES,
    CertificateAuthority,
    cert_path,
    certificate_identity,
    key_path,
    load_certificate,
)
from amm.base.security.errors import SecurityError
from amm.base.security.files import Stamp, stamp
from amm.base.security.identity import Identity, Role, check_name
from amm.base.security.revocation import REVOKED_FILE, Revocations
from amm.base.security.tokens import TOKENS_FILE, TokenFile

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
else:  # imported when first used: see ``lazy``
    from amm.base.security.lazy import Lazy

    x509 = Lazy("cryptography.x509")
    serialization = Lazy("cryptography.hazmat.primitives.serialization")

#: The certs folder, for the CLI and the servers' ``--tls`` default.
ENV_TLS = "AMM_TLS"
#: Which identity of that folder to present; default ``operator``; empty for none (token only).
ENV_IDENTITY = "AMM_IDENTITY"
#: A bearer token, or (preferred, as it keeps the secret out of the environment) a file holding it.
ENV_TOKEN = "AMM_TOKEN"
ENV_TOKEN_FILE = "AMM_TOKEN_FILE"
DEFAULT_IDENTITY = "operator"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Security:
    """TLS material and an optional bearer token. Frozen; the token never shows in its repr.

    ``cert``/``key`` are this process's identity (None: present no certificate); ``tokens`` and
    ``revoked`` are what a server checks callers against (default: the files beside ``ca``).
    """

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    token: str | None = field(default=None, repr=False)
    tokens: Path | None = None
    revoked: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityError("a certificate needs its key and a key its certificate")

    @property
    def directory(self) -> Path:
        """The certs folder: where ``ca.pem`` is."""
        return self.ca.parent

    @classmethod
    def from_dir(
        cls,
        directory: str | Path,
        identity: str | None = DEFAULT_IDENTITY,
        token: str | None = None,
    ) -> Self:
        """The certs folder ``directory`` with identity ``identity`` (``<identity>.pem``); None to
        present no certificate, with ``token`` for a token port. Checks the files exist now so
        that a typo fails at start, not at the first call."""
        directory = Path(directory)
        ca = directory / CA_CERT
        if not ca.is_file():
            raise SecurityError(f"{ca} does not exist: is {directory} a certs folder?")
        cert = key = None
        if identity is not None:
            check_name(identity)
            cert, key = cert_path(directory, identity), key_path(directory, identity)
            for path in (cert, key):
                if not path.is_file():
                    raise SecurityError(f"{path} does not exist: no identity {identity!r} there")
        return cls(
            ca=ca,
            cert=cert,
            key=key,
            token=token,
            tokens=directory / TOKENS_FILE,
            revoked=directory / REVOKED_FILE,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self | None:
        """What ``AMM_TLS``, ``AMM_IDENTITY``, ``AMM_TOKEN`` and ``AMM_TOKEN_FILE`` say; None when
        ``AMM_TLS`` is unset (plaintext). With a token and no ``AMM_IDENTITY``, the default
        ``operator`` identity is used only if the folder has it."""
        env = os.environ if env is None else env
        directory = env.get(ENV_TLS)
        if not directory:
            return None
        token = read_token(env)
        identity: str | None = env.get(ENV_IDENTITY, DEFAULT_IDENTITY) or None
        if (
            ENV_IDENTITY not in env
            and token is not None
            and not cert_path(Path(directory), DEFAULT_IDENTITY).is_file()
        ):
            identity = None
        return cls.from_dir(directory, identity=identity, token=token)

    @classmethod
    def temporary(cls, directory: str | Path) -> Self:
        """A throwaway CA with the default identities (amm, agent, operator, reader) in
        ``directory``, which must hold no CA yet; returns the operator's ``Security``. More
        identities with ``issue``. For tests and ``amm cluster --tls``."""
        ca = CertificateAuthority.create(Path(directory))
        for ident in DEFAULT_IDENTITIES:
            ca.issue(ident)
        return cls.from_dir(directory, DEFAULT_IDENTITY)

    def issue(self, role: Role, name: str, *, sans: tuple[str, ...] = (), days: int = 365) -> Self:
        """Issue (or re-issue) identity ``name`` with ``role`` in this folder, whose CA key must be
        here; returns its ``Security``, e.g. one per agent w1..wN of a local cluster."""
        CertificateAuthority(self.directory).issue(Identity(role, name), sans=sans, days=days)
        return self.as_identity(name)

    def as_identity(self, name: str | None) -> Self:
        """The same folder, presenting identity ``name`` (None: no certificate)."""
        other = type(self).from_dir(self.directory, name)
        return replace(other, token=self.token, tokens=self.tokens, revoked=self.revoked)

    def with_token(self, token: str | None) -> Self:
        return replace(self, token=token)

    def identity(self) -> Identity | None:
        """The identity this process presents (the one in its certificate), if any: an agent's
        default name, and what the AMM should expect it to register as."""
        if self.cert is None:
            return None
        return certificate_identity(load_certificate(self.cert))

    def stamp(self) -> tuple[Stamp | None, ...]:
        """Changes when any of the CA, certificate or key file does: a long-lived client compares
        it to decide when to build a fresh channel."""
        return tuple(stamp(p) for p in (self.ca, self.cert, self.key) if p is not None)

    # -- servers --------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS for a server port: callers must present a certificate of the CA, verified in
        the handshake; the files are re-read when they change."""
        return self._server_credentials(require_client_certificate=True)

    def token_server_credentials(self) -> grpc.ServerCredentials:
        """TLS for a port where callers present bearer tokens instead of certificates (gRPC
        Python cannot request a client certificate without requiring it; see the module doc)."""
        return self._server_credentials(require_client_certificate=False)

    def _server_credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise SecurityError("a server needs a certificate and key (an amm or agent identity)")
        identity = self.identity()
        if identity is not None and not identity.role.serves:
            # Its certificate lacks the serverAuth usage: every client would fail the handshake.
            raise SecurityError(
                f"{self.cert} is {identity}, which cannot serve: use an amm or agent identity"
            )
        fetcher = ServerCertificates(self.ca, self.cert, self.key)
        return grpc.dynamic_ssl_server_credentials(
            fetcher.initial(),
            cast("Callable[[], grpc.ServerCertificateConfiguration]", fetcher),
            require_client_authentication=require_client_certificate,
        )

    def authorizer(self, **options: Any) -> Authorizer:
        """The interceptor that authenticates and authorizes every call, checking tokens and
        revocations against this folder's files; ``options`` go to ``Authorizer``."""
        return Authorizer(
            tokens=TokenFile(self.tokens) if self.tokens is not None else None,
            revoked=Revocations(self.revoked) if self.revoked is not None else None,
            **options,
        )

    # -- clients --------------------------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS trusting only the cluster CA, presenting this identity's certificate if any, and
        sending ``authorization: Bearer <token>`` on every call if a token is set. Reads the files
        now: call again (and build a new channel) after a rotation."""
        root = _read(self.ca)
        chain = _read(self.cert) if self.cert is not None else None
        private = _read(self.key) if self.key is not None else None
        creds = grpc.ssl_channel_credentials(root, private, chain)
        if self.token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(self.token)
            )
        return creds


def expect_server(identity: Identity) -> list[tuple[str, str]]:
    """Channel options that make TLS check the server is ``identity`` (its ``server_name`` SAN),
    whatever address is dialled: for an agent reached by an address its certificate does not
    list, or to be sure the AMM really is the AMM."""
    return [("grpc.ssl_target_name_override", identity.server_name)]


def expect_role(role: Role) -> list[tuple[str, str]]:
    """Channel options that make TLS check the server is some ``role`` of the cluster CA (its
    ``Role.server_name`` SAN), whatever address is dialled: how everyone dials agents, whose
    advertised addresses (container IPs, ``--advertise auto``) no certificate lists."""
    return [("grpc.ssl_target_name_override", role.server_name)]


def read_token(env: Mapping[str, str]) -> str | None:
    """The bearer token from ``AMM_TOKEN``, else from the file ``AMM_TOKEN_FILE`` names; None if
    neither is set."""
    if token := env.get(ENV_TOKEN, "").strip():
        return token
    if path := env.get(ENV_TOKEN_FILE):
        try:
            return Path(path).read_text().strip() or None
        except OSError as err:
            raise SecurityError(f"cannot read {ENV_TOKEN_FILE} {path}: {err.strerror}") from None
    return None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SecurityError(f"cannot read {path}: {err.strerror}") from None


class ServerCertificates:
    """gRPC's certificate fetcher for one server: the current CA and key pair, re-read when any
    of the three files changes.

    gRPC calls it at each new handshake, from its own threads; None means "unchanged". A change
    that cannot be used (a file missing mid-rotation, a certificate whose key has not been written
    yet, garbage) keeps the previous configuration and is tried again at the next handshake.
    """

    def __init__(self, ca: Path, cert: Path, key: Path) -> None:
        self._paths = (ca, cert, key)
        self._lock = threading.Lock()
        self._stamp: tuple[Stamp | None, ...] | None = None
        self._failed: tuple[Stamp | None, ...] | None = None

    def _stamps(self) -> tuple[Stamp | None, ...]:
        return tuple(stamp(p) for p in self._paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ca, cert, key = (_read(p) for p in self._paths)
        try:
            leaf = x509.load_pem_x509_certificate(cert)
            private = serialization.load_pem_private_key(key, password=None)
            x509.load_pem_x509_certificates(ca)
        except (ValueError, TypeError) as err:
            raise SecurityError(f"unusable TLS files {self._paths[1]}: {err}") from None
        if _spki(leaf.public_key()) != _spki(private.public_key()):
            raise SecurityError(f"{self._paths[1]} does not match {self._paths[2]}")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration to start with; ``SecurityError`` if the files are not usable."""
        with self._lock:
            before = self._stamps()
            config = self._load()
            self._stamp = before
            return config

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            now = self._stamps()
        except OSError:
            return None
        with self._lock:
            if now == self._stamp or now == self._failed:
                return None
            try:
                config = self._load()
            except SecurityError as err:
                self._failed = now
                log.error(
                    "TLS files changed but are not usable yet (%s); keeping the old ones", err
                )
                return None
            self._stamp, self._failed = now, None
            log.info("TLS files changed: new connections use %s", self._paths[1])
            return config
