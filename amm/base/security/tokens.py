"""Bearer tokens for people and scripts that hold no certificate.

The token file (``tokens`` in the certs folder, 0600) holds one line per token:
``<role> <name> sha256:<hex>``, ``#`` starting a comment. Only the hash is stored, so the file
grants nothing to whoever reads it; tokens are 256 random bits, so a plain SHA-256 is enough (a
slow password hash protects guessable secrets, which these are not). ``verify`` compares the
hash of what a caller presents with every entry using ``hmac.compare_digest`` and without stopping
at the first match, so timing tells nothing about which entry, or how much of one, matched.

Tokens are for the reader and operator roles only: agents and the AMM are machines of the
cluster and carry certificates, whose names are bound to them by the CA. A token is never
logged; a bad line is reported by its line number only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from amm.base.security.errors import SecurityError
from amm.base.security.files import WatchedFile, append_line
from amm.base.security.identity import Identity, Role, check_name

TOKENS_FILE = "tokens"
#: The roles a token may carry.
TOKEN_ROLES = frozenset({Role.READER, Role.OPERATOR})
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")

log = logging.getLogger(__name__)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    identity: Identity
    digest: bytes


def parse_tokens(text: str, source: str = TOKENS_FILE) -> tuple[TokenEntry, ...]:
    """The entries of a token file; a malformed line is skipped (and logged by number), so one
    typo disables that line only, never opens anything."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 3:
                raise SecurityError("expected '<role> <name> sha256:<hex>'")
            role = Role.parse(fields[0])
            if role not in TOKEN_ROLES:
                raise SecurityError(f"tokens may carry roles reader and operator, not {role.value}")
            match = _DIGEST.match(fields[2])
            if match is None:
                raise SecurityError("the third field must be sha256: and 64 lowercase hex digits")
            ident = Identity(role, check_name(fields[1]), via="token")
        except SecurityError as err:
            log.warning("%s line %d ignored: %s", source, number, err)
            continue
        entries.append(TokenEntry(ident, bytes.fromhex(match.group(1))))
    return tuple(entries)


class TokenFile:
    """The token file of a server, read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = WatchedFile(self.path, lambda text: parse_tokens(text, str(self.path)))

    def verify(self, token: str) -> Identity | None:
        """The identity ``token`` grants, or None. Constant time in the token's content: every
        entry is compared, whatever matched before."""
        presented = digest(token)
        found: Identity | None = None
        for entry in self._file.current():
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = entry.identity
        return found


def mint_token(path: Path, role: Role, name: str) -> str:
    """A new random token for ``role``/``name``; its hash is appended to the token file at
    ``path`` (created 0600). The token itself is returned once and stored nowhere."""
    if role not in TOKEN_ROLES:
        raise SecurityError(
            f"tokens may carry roles reader and operator, not {role.value}: agents and the AMM "
            "use certificates (`amm certs issue`)"
        )
    check_name(name)
    token = secrets.token_urlsafe(32)
    append_line(path, f"{role.value} {name} sha256:{digest(token).hex()}")
    return token
