"""Sending directives: one long-lived bidirectional stream per agent.

Directives go out on the worker's stream as soon as the core picks them; outcomes come back in
completion order and are handed to ``on_outcome``. When a stream ends, every directive sent on it
without an answer is reported FAILED at once (the agent may or may not have applied it; the next
poll tells), so nobody waits for the directive timeout on a dead worker. A broken stream is
reopened on the next send; directives are idempotent and agents enforce integrity themselves, so
a lost one costs time, never data.

The dispatcher owns one task per stream and ends them itself on ``close`` (a server shutting down
does not end client streams for us: grpc/grpc#37239).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from amm.v1 import agent_pb2
from amm_service import wire
from amm_service.agents import AgentLinks
from amm_service.directive import Directive, Outcome, OutcomeStatus
from amm_service.view import WorkerId

log = logging.getLogger(__name__)

OutcomeHandler = Callable[[WorkerId, Outcome], None]
_CLOSE = None


class _Stream:
    """The directive stream to one agent, with the task that reads its outcomes."""

    def __init__(self, worker: WorkerId, links: AgentLinks, on_outcome: OutcomeHandler) -> None:
        self.worker = worker
        self.queue: asyncio.Queue[agent_pb2.DirectivesRequest | None] = asyncio.Queue()
        self.unanswered: dict[str, None] = {}
        self._on_outcome = on_outcome
        self._call = links.stub(worker).Directives(self._requests())
        self.task = asyncio.create_task(self._read(), name=f"amm-directives-{worker}")

    async def _requests(self) -> AsyncIterator[agent_pb2.DirectivesRequest]:
        while (item := await self.queue.get()) is not _CLOSE:
            yield item

    def send(self, directive: Directive) -> None:
        self.unanswered[directive.id] = None
        self.queue.put_nowait(
            agent_pb2.DirectivesRequest(directive=wire.directive_to_pb(directive))
        )

    async def _read(self) -> None:
        why = "the agent ended the directive stream"
        try:
            async for response in self._call:
                outcome = wire.outcome_from_pb(response.outcome)
                self.unanswered.pop(outcome.directive_id, None)
                self._on_outcome(self.worker, outcome)
        except grpc.aio.AioRpcError as err:
            why = f"directive stream broke: {err.code().name}"
            if err.code() != grpc.StatusCode.CANCELLED:
                log.info("directive stream to %s ended: %s", self.worker, err.code().name)
        except Exception:
            why = "directive stream failed"
            log.exception("directive stream to %s failed", self.worker)
        finally:
            lost, self.unanswered = list(self.unanswered), {}
            for directive_id in lost:
                self._on_outcome(
                    self.worker, Outcome(directive_id, OutcomeStatus.FAILED, message=why)
                )

    async def close(self) -> None:
        self.queue.put_nowait(_CLOSE)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=1.0)
        except TimeoutError:
            self._call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class Dispatcher:
    """Sends directives to agents and reports their outcomes."""

    def __init__(self, links: AgentLinks, on_outcome: OutcomeHandler) -> None:
        self._links = links
        self._on_outcome = on_outcome
        self._streams: dict[WorkerId, _Stream] = {}
        self._closed = False

    def send(self, directive: Directive) -> None:
        if self._closed:
            raise RuntimeError("dispatcher is closed")
        stream = self._streams.get(directive.worker)
        if stream is None or stream.task.done():
            stream = self._streams[directive.worker] = _Stream(
                directive.worker, self._links, self._on_outcome
            )
        stream.send(directive)

    async def close_worker(self, worker: WorkerId) -> None:
        stream = self._streams.pop(worker, None)
        if stream is not None:
            await stream.close()

    async def close(self) -> None:
        """End every stream; idempotent."""
        self._closed = True
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(s.close() for s in streams))
