"""``amm health``: the grpc.health.v1 check that container health checks run.

The AMM and every agent serve the standard health service (``amm.base.serving``), NOT_SERVING
from the moment they begin to stop. Asking it from the ``amm`` command means an image needs no
separate ``grpc_health_probe`` binary. Synchronous: a probe runs once and exits. Health is open to
every caller, but a mutual-TLS port still wants a certificate of the cluster CA in the handshake:
a probe inside a container presents the server's own (``AMM_TLS``, ``AMM_IDENTITY``).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from amm.base.security import Security
from amm.base.serving import open_blocking_channel
from amm.errors import AmmError

SERVING = "SERVING"
#: Seconds a probe waits by default: well under a health check's own timeout.
DEFAULT_TIMEOUT = 3.0


def check(
    address: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    security: Security | None = None,
) -> str:
    """The status the server at ``address`` reports for ``service`` ("" = the server as a whole):
    ``SERVING``, ``NOT_SERVING``, ...

    Raises ``AmmError`` when no status can be had: nothing listens, no answer within ``timeout``
    seconds, or the server knows no such service (NOT_FOUND).
    """
    with open_blocking_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            what = f"service {service!r}" if service else "the server"
            raise AmmError(err.code(), f"health of {what} at {address}: {err.details()}") from err
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
