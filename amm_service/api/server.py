"""Assembling and running the AMM: state store, policies, manager and the gRPC server.

``AmmServer`` is what tests and ``python -m amm_service`` start. Shutdown follows one order:
health NOT_SERVING, stop the cycle loop, end our directive streams, ``server.stop(grace)``, close
channels, close the state store.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from google.protobuf.json_format import MessageToDict

from amm.base.guard import Complaints, collect, register_guarded
from amm.base.metrics import MetricsEndpoint
from amm.base.security import Role, Security, SecurityError
from amm.base.serving import Served, bound_address, serve, stop_on_signals
from amm.v1 import control_pb2, control_pb2_grpc
from amm_service.api.control import ControlServicer
from amm_service.api.dashboard import Dashboard
from amm_service.config import AmmConfig
from amm_service.policies import Policy, build_all
from amm_service.runtime import metrics
from amm_service.runtime.loop.loop_probe import maybe_probe
from amm_service.runtime.loop.pacing import watch_arrivals
from amm_service.runtime.manager import ActiveMemoryManager
from amm_service.runtime.records.state import StateStore

log = logging.getLogger(__name__)

SERVICE_NAME = control_pb2.DESCRIPTOR.services_by_name["ActiveMemoryManager"].full_name


def build_security(config: AmmConfig) -> Security | None:
    """The AMM's TLS material, checked now: the files exist and the identity is the AMM's (an
    agent's or an operator's certificate would be refused by every agent)."""
    if config.tls is None:
        return None
    security = Security.from_dir(config.tls, identity=config.tls_identity)
    identity = security.identity()
    if identity is None or identity.role is not Role.AMM:
        raise SecurityError(
            f"{security.cert} is {identity or 'no amm identity'}: the AMM needs an amm identity "
            "(--tls-identity)"
        )
    return security


def build_policies(config: AmmConfig) -> list[Policy]:
    """Instantiate the configured policies; raises PolicyError with a clear message."""
    return build_all([(spec.class_path, spec.kwargs) for spec in config.policies])


class AmmServer:
    """The AMM service, started and stopped as one unit."""

    def __init__(self, config: AmmConfig, *, grace: float = 0.5) -> None:
        self.config = config
        self._grace = grace
        self._policies = build_policies(config)
        self.security = build_security(config)
        self._store: StateStore | None = None
        self._served: Served | None = None
        self.manager: ActiveMemoryManager | None = None
        self.address = ""
        #: The metrics endpoint, when ``config.metrics_listen`` asks for one.
        self.metrics: MetricsEndpoint | None = None
        #: The dashboard, when ``config.dashboard_listen`` asks for one.
        self.dashboard: Dashboard | None = None
        #: The bearer-token port's address, when ``token_listen`` is set.
        self.token_address: str | None = None

    async def start(self) -> None:
        watch_arrivals(asyncio.get_running_loop())  # control calls arrive before bulk work
        self._store = StateStore(self.config.state_path)
        try:
            self.manager = ActiveMemoryManager(
                self.config, self._policies, self._store, security=self.security
            )
            await self.manager.open()
            servicer = ControlServicer(self.manager)
            # Guarded: an undecodable request is INVALID_ARGUMENT, logged once in a while.
            handlers = collect(control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server, servicer)
            complaints = Complaints(log)
            if self.config.metrics_listen:
                self.metrics = metrics.endpoint(
                    self.manager,
                    self.config.metrics_listen,
                    self.security,
                    insecure=self.config.insecure,
                )
            self._served = await serve(
                self.config.listen,
                [lambda server: register_guarded(server, SERVICE_NAME, handlers, complaints)],
                [SERVICE_NAME],
                interceptors=self.metrics.interceptors if self.metrics is not None else (),
                security=self.security,
                token_listen=self.config.token_listen,
                insecure=self.config.insecure,
            )
            if self.metrics is not None:
                self.metrics.start()
            if self.config.dashboard_listen and self.manager.history is not None:
                self.dashboard = Dashboard(
                    self.config.dashboard_listen,
                    self.manager.history,
                    lambda: _status_json(servicer),
                    security=self.security,
                    insecure=self.config.insecure,
                )
                await self.dashboard.start()
        except BaseException:
            await self.stop()
            raise
        self.address = bound_address(self.config.listen, self._served.port)
        if self.config.token_listen and self._served.token_port is not None:
            self.token_address = bound_address(self.config.token_listen, self._served.token_port)
        log.info(
            "AMM serving on %s%s (epoch %d)%s",
            self.address,
            " with mutual TLS" if self.security else "",
            self.manager.epoch,
            f"; bearer tokens on {self.token_address}" if self.token_address else "",
        )

    @property
    def epoch(self) -> int:
        return self.manager.epoch if self.manager else 0

    async def stop(self) -> None:
        """Idempotent."""
        if self._served is not None:
            await self._served.set_serving(False)
        if self.manager is not None:
            await self.manager.close()
        stops = [self.metrics.stop()] if self.metrics is not None else []
        if self.dashboard is not None:
            stops.append(self.dashboard.stop())
        if self._served is not None:
            stops.append(self._served.stop(self._grace))
        await asyncio.gather(*stops)
        if self._store is not None:
            self._store.close()

    async def __aenter__(self) -> AmmServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class _LocalCall:
    """The context of a control call made in-process (the dashboard's status): an error the
    servicer would abort the call with is raised instead."""

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


async def _status_json(servicer: ControlServicer) -> dict[str, Any]:
    """``GetStatus`` as its canonical JSON mapping (64-bit integers as strings)."""
    response = await servicer.GetStatus(control_pb2.GetStatusRequest(), _LocalCall())  # type: ignore[arg-type]
    return MessageToDict(response, preserving_proto_field_name=True)


async def run(config: AmmConfig) -> None:
    """Serve until SIGTERM or SIGINT; print the ready line once serving."""
    stop = asyncio.Event()
    async with maybe_probe(), AmmServer(config) as server:
        line = f"amm-service ready address={server.address} epoch={server.epoch}"
        if server.token_address:
            line += f" token_address={server.token_address}"
        if server.metrics is not None:
            line += f" metrics={server.metrics.address}"
        if server.dashboard is not None:
            line += f" dashboard={server.dashboard.address}"
        print(line, flush=True)
        with stop_on_signals(stop):
            await stop.wait()
        log.info("AMM shutting down")
