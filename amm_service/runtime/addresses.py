"""Worker addresses: what a valid one looks like, and the order people read them in.

The registry validates an address once, at registration; the queries and the retirement calls
sort their answers by address, host first, then port as a number (``w:9`` before ``w:10``).
"""

from __future__ import annotations

import re

from amm_service.decisions.view import WorkerId
from amm_service.errors import InvalidArgument

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):([0-9]{1,5})$")


def address_order(address: str) -> tuple[str, int, str]:
    """Sort key for worker addresses: by host, then numerically by port."""
    host, _, port = address.rpartition(":")
    return (host, int(port) if port.isdigit() else -1, address)


def check_address(address: str) -> WorkerId:
    match = _ADDRESS.match(address)
    if match is None or int(match.group(2)) > 65535 or int(match.group(2)) == 0:
        raise InvalidArgument(f"invalid worker address {address!r}: expected HOST:PORT")
    return WorkerId(address)
