"""Worker addresses: what a valid one looks like, and the order people read them in.

The registry validates an address once, at registration; the queries and the retirement calls
sort their answers by address, host first, then port as a number (``w:9`` before ``w:10``).
"""

from __future__ import annotations

from amm.base.validation import address_problem
from amm_service.decisions.view import WorkerId
from amm_service.errors import InvalidArgument


def address_order(address: str) -> tuple[str, int, str]:
    """Sort key for worker addresses: by host, then numerically by port."""
    host, _, port = address.rpartition(":")
    return (host, int(port) if port.isdigit() else -1, address)


def check_address(address: str) -> WorkerId:
    """A worker address by the rules an agent's own flags follow (``amm.base.validation``)."""
    problem = address_problem("a worker address", address)
    if problem is not None:
        raise InvalidArgument(problem)
    return WorkerId(address)
