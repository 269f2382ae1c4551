"""Mutual TLS, identities and roles for every plane of an amm cluster.

One cluster CA issues each process a certificate whose URI SAN names its role and name
(``identity``, ``certs``); people and scripts without a certificate use bearer tokens (``tokens``).
Servers authenticate and authorize every call against a deny-by-default rule table (``authz``),
honour revocations (``revocation``) and reload rotated files without a restart (``credentials``,
``files``); ``listen`` keeps plaintext on loopback unless told otherwise.
"""

from amm.base.security.authz import RULES, Authorizer, Denial, caller
from amm.base.security.certs import CertificateAuthority, Issued, init_directory
from amm.base.security.credentials import Security, expect_role, expect_server, read_token
from amm.base.security.errors import SecurityError
from amm.base.security.identity import Identity, Role, may_act_as, parse_uri
from amm.base.security.listen import check_listen, is_loopback
from amm.base.security.revocation import Revocations, revoke
from amm.base.security.tokens import TokenFile, mint_token

__all__ = [
    "RULES",
    "Authorizer",
    "CertificateAuthority",
    "Denial",
    "Identity",
    "Issued",
    "Revocations",
    "Role",
    "Security",
    "SecurityError",
    "TokenFile",
    "caller",
    "check_listen",
    "expect_role",
    "expect_server",
    "init_directory",
    "is_loopback",
    "may_act_as",
    "mint_token",
    "parse_uri",
    "read_token",
    "revoke",
]
