"""Who a caller is: a role and a name, carried in a certificate's URI SAN or granted by a token.

The URI is ``spiffe://amm/<role>/<name>``: SPIFFE's shape, so that gRPC itself reports it as the
peer's ``peer_spiffe_id`` and tools that know SPIFFE read it, with ``amm`` as the trust domain.
Names are DNS labels (lowercase letters, digits and inner hyphens, at most 63): the same string is
then safe as a file name (``<name>.pem``), in a URI, in a DNS SAN (``Identity.server_name``) and
in a log line. Names are unique in a cluster whatever the role: the certs folder keys files by
name, and revocation lists names.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

from amm.base.security.errors import SecurityError

TRUST_DOMAIN = "amm"
URI_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
#: Names that would clash with the certs folder's own files (``ca.pem``).
RESERVED_NAMES = frozenset({"ca"})
#: The agent identity ``amm certs init`` makes for every agent to share (see ``may_act_as``).
SHARED_AGENT_NAME = "agent"


class Role(enum.Enum):
    """What an identity may do; ``amm_service`` and the agents enforce it through ``authz``."""

    READER = "reader"
    OPERATOR = "operator"
    AGENT = "agent"
    AMM = "amm"

    @property
    def serves(self) -> bool:
        """Whether certificates of this role run servers (and so carry DNS/IP SANs)."""
        return self in (Role.AGENT, Role.AMM)

    @property
    def server_name(self) -> str:
        """A DNS SAN of every serving certificate of this role (``agent.amm``): a client that
        dials an address no certificate could list (an agent's advertised container IP) checks
        that some server of this role of the cluster CA answers (``credentials.expect_role``)."""
        return f"{self.value}.{TRUST_DOMAIN}"

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(r.value for r in cls)
            raise SecurityError(f"unknown role {text!r}: expected one of {choices}") from None


#: How an identity was proven: a verified certificate or a bearer token.
Via = Literal["certificate", "token"]


def check_name(name: str) -> str:
    """``name`` if it can be an identity's name; else ``SecurityError`` saying what a name is."""
    if not _NAME.match(name):
        raise SecurityError(
            f"invalid identity name {name!r}: use 1-63 lowercase letters, digits and inner "
            "hyphens (a DNS label)"
        )
    if name in RESERVED_NAMES:
        raise SecurityError(f"{name!r} is reserved (the CA's own files are {name}.pem)")
    return name


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller: ``role`` decides what it may do, ``name`` who it is, ``via`` how it proved it."""

    role: Role
    name: str
    via: Via = "certificate"

    @property
    def uri(self) -> str:
        """The URI SAN that a certificate of this identity carries."""
        return f"{URI_PREFIX}{self.role.value}/{self.name}"

    @property
    def server_name(self) -> str:
        """A DNS SAN of every serving certificate: a client that dials an address but wants this
        very identity on the other end sets it as ``grpc.ssl_target_name_override``
        (``credentials.expect_server``)."""
        return f"{self.name}.{self.role.value}.{TRUST_DOMAIN}"

    def __str__(self) -> str:
        return f"{self.role.value} {self.name!r}"


def parse_uri(uri: str) -> Identity | None:
    """The identity in a URI SAN; None when the URI is not an amm identity (another trust domain,
    an unknown role, a malformed name)."""
    if not uri.startswith(URI_PREFIX):
        return None
    role_text, sep, name = uri[len(URI_PREFIX) :].partition("/")
    if not sep:
        return None
    try:
        return Identity(Role.parse(role_text), check_name(name))
    except SecurityError:
        return None


def may_act_as(identity: Identity, worker_name: str) -> bool:
    """Whether an agent identity may register (or unregister) the worker ``worker_name``.

    A named agent certificate (``amm certs issue --role agent --name w7``) acts only as itself.
    The shared ``agent`` identity that ``amm certs init`` makes stands for any agent: whoever holds
    it may register under any name, which is the point of sharing it (local clusters, one cert
    for a fleet) and its price; issue one certificate per agent where that matters.
    """
    if identity.role is not Role.AGENT:
        return False
    return identity.name in (worker_name, SHARED_AGENT_NAME)
