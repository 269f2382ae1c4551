"""The one exception type that callers of amm see.

It carries the gRPC status code, so callers branch on ``err.status`` rather than parse messages.
"""

from __future__ import annotations

import grpc


class AmmError(Exception):
    """An amm call failed; ``status`` is the gRPC status code and ``message`` says why."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
