"""Identities and certificates that must stop working before they expire.

Python's gRPC cannot check CRLs during the handshake, so revocation is enforced per call by the
authorizer against ``revoked`` in the certs folder, read again when it changes. One entry a line:
a name (every certificate and token of that name, e.g. a lost laptop's operator identity) or
``serial:<hex>`` (one certificate, e.g. the old one after a re-issue); ``#`` starts a comment.
Unparseable lines are logged and skipped. Copy the file to every server of the cluster (or share
the folder): each reads its own.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from amm.base.security.errors import SecurityError
from amm.base.security.files import WatchedFile, append_line
from amm.base.security.identity import Identity, check_name

REVOKED_FILE = "revoked"
_SERIAL = re.compile(r"^serial:(?:0x)?([0-9a-fA-F:]+)$")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RevokedSet:
    names: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()


def parse_serial(text: str) -> int:
    """A certificate serial written as hex, with or without colons or ``0x`` (openssl's
    ``-serial`` prints ``serial=HEX``)."""
    digits = text.removeprefix("serial=").removeprefix("0x").replace(":", "")
    try:
        return int(digits, 16)
    except ValueError:
        raise SecurityError(f"invalid serial {text!r}: expected hex digits") from None


def parse_revoked(text: str, source: str = REVOKED_FILE) -> RevokedSet:
    names: set[str] = set()
    serials: set[int] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            if match := _SERIAL.match(line):
                serials.add(parse_serial(match.group(1)))
            else:
                names.add(check_name(line))
        except SecurityError as err:
            log.warning("%s line %d ignored: %s", source, number, err)
    return RevokedSet(frozenset(names), frozenset(serials))


class Revocations:
    """The revocation list of a server, read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = WatchedFile(self.path, lambda text: parse_revoked(text, str(self.path)))

    def reason(self, identity: Identity, serial: int | None = None) -> str | None:
        """Why ``identity`` (holding the certificate ``serial``, if any) is revoked; None if not."""
        current = self._file.current()
        if identity.name in current.names:
            return f"identity {identity.name!r} is revoked"
        if serial is not None and serial in current.serials:
            return f"certificate serial {serial:x} is revoked"
        return None


def revoke(path: Path, *, name: str | None = None, serial: int | None = None) -> str:
    """Append a name or a certificate serial to the revocation list at ``path``; returns the line
    written."""
    if (name is None) == (serial is None):
        raise SecurityError("revoke a --name or a --serial")
    line = f"serial:{serial:x}" if serial is not None else check_name(name or "")
    append_line(path, line, mode=0o644)
    return line
