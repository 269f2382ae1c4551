"""The AMM's connections to its agents: one channel per worker address, reused by the poller,
the dispatcher and the queries, and one more for short questions (``AgentLinks.quick``).
Channels are created inside the running loop, on first use, and closed when a worker leaves,
registers again (a new process) or the AMM stops. With TLS the AMM presents its amm identity and
accepts any agent of the cluster CA at a registered address (``serving.open_channel``).

Closing a channel cancels the calls under way on it: their awaiter gets ``CancelledError``
although its own task was not cancelled. ``channel_closed`` tells the two apart, so that a poll
cut short by a re-registration is a failed call to its caller, not a cancellation that escapes a
cycle or an RPC handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from amm.base.security import Role, Security
from amm.base.serving import CHANNEL_OPTIONS, open_channel
from amm.v1 import agent_pb2_grpc
from amm_service.decisions.view import WorkerId

log = logging.getLogger(__name__)

#: A channel of its own subchannels: gRPC otherwise shares them process-wide, and the channel
#: opened for an agent that restarted at an address (``close``, then a poll at once) inherited
#: the old process's failed connection and its backoff, failing that poll as UNAVAILABLE.
LINK_OPTIONS: list[tuple[str, int]] = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def channel_closed() -> bool:
    """Whether a ``CancelledError`` caught now came from a call whose channel was closed, and
    not from the current task being cancelled (which must go on propagating)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class AgentLinks:
    """Channels and stubs to agents, keyed by worker address: per worker, one channel for the
    bulk of the traffic (polls, directive streams) and one for short questions (``quick``)."""

    def __init__(self, security: Security | None = None) -> None:
        self._security = security
        self._channels: dict[tuple[WorkerId, bool], grpc.aio.Channel] = {}
        self._stubs: dict[tuple[WorkerId, bool], agent_pb2_grpc.WorkerAgentAsyncStub] = {}
        self._closed = False

    def stub(self, worker: WorkerId) -> agent_pb2_grpc.WorkerAgentAsyncStub:
        return self._stub(worker, quick=False)

    def quick(self, worker: WorkerId) -> agent_pb2_grpc.WorkerAgentAsyncStub:
        """A stub on a channel (a connection) of its own for small calls answered at once
        (HoldsKeys): on the bulk channel they queued behind megabytes of directives and poll
        pages sharing the connection while a big cycle ran."""
        return self._stub(worker, quick=True)

    def _stub(self, worker: WorkerId, *, quick: bool) -> agent_pb2_grpc.WorkerAgentAsyncStub:
        lane = (worker, quick)
        stub = self._stubs.get(lane)
        if stub is None:
            if self._closed:
                raise RuntimeError("the AMM's agent links are closed")
            channel = open_channel(worker, self._security, expect=Role.AGENT, options=LINK_OPTIONS)
            self._channels[lane] = channel
            stub = self._stubs[lane] = agent_pb2_grpc.WorkerAgentStub(channel)
        return stub

    async def close(self, worker: WorkerId) -> None:
        for lane in ((worker, False), (worker, True)):
            self._stubs.pop(lane, None)
            channel = self._channels.pop(lane, None)
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close(grace=None)

    async def close_all(self) -> None:
        self._closed = True
        for worker in {worker for worker, _ in self._channels}:
            await self.close(worker)
