"""Expected failures of the AMM's operations, mapped to gRPC status codes in one place.

Domain code raises these with a message a user can act on; ``control`` turns them into statuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class AmmServiceError(Exception):
    """Base: ``status`` is the gRPC code the edge answers with."""

    status = grpc.StatusCode.INTERNAL


class InvalidArgument(AmmServiceError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AmmServiceError):
    status = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(AmmServiceError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(AmmServiceError):
    status = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(AmmServiceError):
    """An authenticated caller asked for something its identity may not do (``caller()``)."""

    status = grpc.StatusCode.PERMISSION_DENIED


def listing(items: Sequence[str], limit: int = 10) -> str:
    """``a, b, c`` — at most ``limit`` items, then how many more."""
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
