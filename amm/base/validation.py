"""What a worker may declare about itself, and the bounds of an AMM epoch: one set of rules.

The agent checks its own flags with these functions and the AMM checks what ``RegisterWorker``
brings with the same ones, so that the AMM accepts nothing an agent could not have been started
with (a 300-character host, a zone holding a newline). Each ``*_problem`` function returns None
for a good value, else a message that names the field and what would be accepted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

#: The largest epoch on the wire. An AMM moves its epoch by at most 2^20 per start, so no AMM
#: comes near it; a Poll, a directive or a registration carrying more is malformed. 2^53 - 1 is also
#: the largest integer JSON (grpcurl) carries exactly.
MAX_EPOCH = 2**53 - 1
#: The highest epoch a fresh AMM moves past when its agents report one newer than its own. Half
#: of the range: whatever a registration claims, at least 2^32 restarts remain before
#: ``MAX_EPOCH``, so no forged call can use the range up and keep the AMM from starting.
MAX_ADOPTED_EPOCH = 2**52
#: Longest host name (DNS's limit), worker name, zone and incarnation, in characters.
MAX_HOST_CHARS = 253
MAX_NAME_CHARS = 256
MAX_ZONE_CHARS = 128
MAX_INCARNATION_CHARS = 128

# A host name or IPv4 address of 1 to 253 characters, or an IPv6 address in brackets; a port.
_ADDRESS = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+(?:%[0-9A-Za-z._-]+)?\]|[0-9A-Za-z](?:[0-9A-Za-z._-]{0,251}[0-9A-Za-z])?)"
    r":([0-9]{1,5})"
)


@functools.lru_cache(maxsize=4096)
def is_address(text: str, *, port_zero: bool = False) -> bool:
    """``HOST:PORT``, the only form of worker address: anything else gRPC would dial too
    (``unix:/path``, ``dns:///name``) is refused, so no caller makes an agent or the AMM dial a
    socket or resolver of its choosing. Port 0 (pick a free one) only with ``port_zero``, for
    an address to bind."""
    match = _ADDRESS.fullmatch(text)
    if match is None:
        return False
    port = int(match.group(1))
    return (0 if port_zero else 1) <= port <= 65535


def address_problem(field: str, value: str, *, port_zero: bool = False) -> str | None:
    """Why ``value`` is no ``HOST:PORT`` address for ``field``, or None."""
    if is_address(value, port_zero=port_zero):
        return None
    ports = "0-65535, 0 picks a free one" if port_zero else "1-65535"
    return (
        f"{field} must be HOST:PORT (a host name or IP address of at most {MAX_HOST_CHARS} "
        f"characters, IPv6 in brackets, port {ports}; for example 127.0.0.1:50061), "
        f"got {_shown(value)}"
    )


def bad_addresses(addresses: Iterable[str]) -> str | None:
    """A message naming the addresses that are not ``HOST:PORT``, or None when all are."""
    bad = [address for address in addresses if not is_address(address)]
    if not bad:
        return None
    return f"not a HOST:PORT address: {', '.join(_shown(a) for a in bad[:3])}"


def name_problem(value: str) -> str | None:
    """Why ``value`` is no worker name (printable, not blank, at most 256 characters), or None."""
    if not value.strip():
        return "name must not be blank; leave it unset to use the address"
    if len(value) > MAX_NAME_CHARS:
        return f"name must be at most {MAX_NAME_CHARS} characters, got {len(value)}"
    if not value.isprintable():
        return f"name must hold printable characters only (no newline), got {_shown(value)}"
    return None


def zone_problem(value: str) -> str | None:
    """Why ``value`` is no zone (printable, no whitespace, at most 128 characters), or None.
    The empty zone means none and is fine."""
    if any(c.isspace() for c in value):
        return f"zone must not contain whitespace, got {_shown(value)}"
    if len(value) > MAX_ZONE_CHARS:
        return f"zone must be at most {MAX_ZONE_CHARS} characters, got {len(value)}"
    if not value.isprintable():
        return f"zone must hold printable characters only, got {_shown(value)}"
    return None


def incarnation_problem(value: str) -> str | None:
    """Why ``value`` is no agent incarnation (1 to 128 printable characters, no whitespace)."""
    if not value:
        return "incarnation is required: a random id per agent process start"
    if (
        len(value) > MAX_INCARNATION_CHARS
        or not value.isprintable()
        or any(c.isspace() for c in value)
    ):
        return (
            f"incarnation must be 1 to {MAX_INCARNATION_CHARS} printable characters without "
            f"whitespace, got {_shown(value)}"
        )
    return None


def epoch_problem(field: str, value: int, *, most: int = MAX_EPOCH) -> str | None:
    """Why ``value`` is no epoch (0 to ``most``), or None."""
    if 0 <= value <= most:
        return None
    return f"{field} {value} is out of range: no AMM issues epochs above {most}"


def _shown(value: str) -> str:
    """``value`` for a message: quoted, and cut at 100 characters."""
    return repr(value[:100]) + (f" ({len(value)} characters)" if len(value) > 100 else "")
