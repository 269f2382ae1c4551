"""In-process fakes of the AMM and of worker agents, for testing the client and the CLI.

They speak the real wire contract over real ``grpc.aio`` servers on ``127.0.0.1:0`` but keep all
state in one Python object, so client behaviour (ordering, streaming, checksums, error mapping) is
tested without the service or agent packages. They run on their own event loop in a thread, so
that blocking ``Client`` calls from a test never starve them. They decide nothing: ``RunOnce``
returns a canned report and no replica ever moves unless a ``Get`` asks for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from amm.checksum import checksum, chunks
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2


@dataclass
class FakeWorker:
    """One fake agent's state; ``corrupt`` makes it announce a wrong checksum on Get."""

    address: str = ""
    name: str = ""
    store: dict[str, bytes] = field(default_factory=dict)
    pins: Counter[str] = field(default_factory=Counter)
    status: int = types_pb2.WORKER_STATUS_RUNNING
    corrupt: bool = False


class FakeState:
    """What the fake AMM and agents share: the workers and the AMM's running flag."""

    def __init__(self) -> None:
        self.workers: dict[str, FakeWorker] = {}
        self.running = False
        self.cycles = 0

    def holders(self, key: str) -> list[str]:
        return [w.address for w in self.workers.values() if key in w.store]


async def _abort(context: Any, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message)


class FakeAmm(control_pb2_grpc.ActiveMemoryManagerServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    async def Start(self, request: Any, context: Any) -> control_pb2.StartResponse:
        self.state.running = True
        return control_pb2.StartResponse(running=True)

    async def Stop(self, request: Any, context: Any) -> control_pb2.StopResponse:
        self.state.running = False
        return control_pb2.StopResponse(running=False)

    async def Running(self, request: Any, context: Any) -> control_pb2.RunningResponse:
        return control_pb2.RunningResponse(running=self.state.running)

    async def RunOnce(self, request: Any, context: Any) -> control_pb2.RunOnceResponse:
        self.state.cycles += 1
        cycle = types_pb2.CycleReport(number=self.state.cycles, suggestions=1, rejected=1)
        cycle.rejections.add(policy="reduce-replicas", op=2, key="x", reason="last replica")
        cycle.duration.FromMilliseconds(12)
        return control_pb2.RunOnceResponse(cycle=cycle)

    async def GetStatus(self, request: Any, context: Any) -> control_pb2.GetStatusResponse:
        reply = control_pb2.GetStatusResponse(
            running=self.state.running,
            epoch=3,
            cycles=self.state.cycles,
            measure=types_pb2.MEMORY_MEASURE_OPTIMISTIC,
        )
        reply.interval.FromMilliseconds(500)
        reply.policies.add(name="reduce-replicas", class_path="p.ReduceReplicas", kwargs_json="{}")
        reply.totals.workers = len(self.state.workers)
        return reply

    async def ListWorkers(self, request: Any, context: Any) -> control_pb2.ListWorkersResponse:
        reply = control_pb2.ListWorkersResponse()
        for w in self.state.workers.values():
            managed = sum(len(v) for v in w.store.values())
            info = reply.workers.add(
                address=w.address, name=w.name, status=w.status, key_count=len(w.store)
            )
            info.memory.managed_bytes = managed
            info.memory_bytes = managed
        return reply

    async def WhoHas(self, request: Any, context: Any) -> control_pb2.WhoHasResponse:
        everything = {k for w in self.state.workers.values() for k in w.store}
        keys = list(request.keys) or sorted(everything)
        reply = control_pb2.WhoHasResponse()
        for key in keys:
            if key not in everything:
                await _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown key {key!r}")
            reply.entries.add(key=key, workers=self.state.holders(key)[::-1])
        return reply

    async def HasWhat(self, request: Any, context: Any) -> control_pb2.HasWhatResponse:
        names = list(request.workers) or list(self.state.workers)
        reply = control_pb2.HasWhatResponse()
        for name in names:
            if name not in self.state.workers:
                await _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown worker {name!r}")
            reply.entries.add(worker=name, keys=sorted(self.state.workers[name].store))
        return reply

    async def Forget(self, request: Any, context: Any) -> control_pb2.ForgetResponse:
        deleted = 0
        for key in request.keys:
            for w in self.state.workers.values():
                deleted += w.store.pop(key, None) is not None
        return control_pb2.ForgetResponse(replicas_deleted=deleted)

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")

    async def UnregisterWorker(self, request: Any, context: Any) -> Any:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")


class FakeAgent(agent_pb2_grpc.WorkerAgentServicer):
    def __init__(self, state: FakeState, worker: FakeWorker) -> None:
        self.state = state
        self.worker = worker

    async def Put(self, request_iterator: Any, context: Any) -> agent_pb2.PutResponse:
        header: agent_pb2.PutHeader | None = None
        parts: list[bytes] = []
        async for message in request_iterator:
            if header is None:
                header = message.header
            else:
                parts.append(message.chunk)
        assert header is not None
        value = b"".join(parts)
        if len(value) != header.size or checksum(value) != header.checksum:
            await _abort(context, grpc.StatusCode.DATA_LOSS, "checksum mismatch")
        old = self.worker.store.get(header.key)
        if old is not None and old != value:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, f"{header.key!r} differs")
        self.worker.store[header.key] = value
        return agent_pb2.PutResponse(
            key=header.key, size=len(value), checksum=checksum(value), created=old is None
        )

    async def Get(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.GetResponse]:
        key = request.key
        replicated = False
        if key not in self.worker.store:
            holders = self.state.holders(key)
            if not holders:
                await _abort(context, grpc.StatusCode.NOT_FOUND, f"no worker holds {key!r}")
            self.worker.store[key] = self.state.workers[holders[0]].store[key]
            replicated = True
        value = self.worker.store[key]
        digest = checksum(b"corrupt" if self.worker.corrupt else value)
        yield agent_pb2.GetResponse(
            header=types_pb2.ValueHeader(
                key=key, size=len(value), checksum=digest, replicated=replicated
            )
        )
        for chunk in chunks(value, 4):
            yield agent_pb2.GetResponse(chunk=chunk)

    async def Pin(self, request: Any, context: Any) -> agent_pb2.PinResponse:
        if request.key not in self.worker.store:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"{request.key!r} is not held here")
        self.worker.pins[request.key] += 1
        return agent_pb2.PinResponse(pins=self.worker.pins[request.key])

    async def Unpin(self, request: Any, context: Any) -> agent_pb2.UnpinResponse:
        if self.worker.pins[request.key] == 0:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "not pinned")
        self.worker.pins[request.key] -= 1
        return agent_pb2.UnpinResponse(pins=self.worker.pins[request.key])

    async def Delete(self, request: Any, context: Any) -> Any:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")

    async def Poll(self, request: Any, context: Any) -> Any:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")

    async def PromiseKeep(self, request: Any, context: Any) -> Any:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")
        yield agent_pb2.FetchResponse()

    async def Directives(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[agent_pb2.DirectivesResponse]:
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "fake")
        yield agent_pb2.DirectivesResponse()


class FakeCluster:
    """A fake AMM and ``n`` fake agents served from a background thread; use as a context."""

    def __init__(self, n: int = 2) -> None:
        self.state = FakeState()
        self._n = n
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[grpc.aio.Server] = []
        self.address = ""

    @property
    def workers(self) -> list[str]:
        return list(self.state.workers)

    def __enter__(self) -> FakeCluster:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _serve(self, add: Any) -> str:
        server = grpc.aio.server()
        add(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._servers.append(server)
        return f"127.0.0.1:{port}"

    async def _start(self) -> None:
        self.address = await self._serve(
            lambda s: control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server(
                FakeAmm(self.state), s
            )
        )
        for i in range(self._n):
            worker = FakeWorker(name=f"fake-{i}")
            worker.address = await self._serve(
                lambda s, w=worker: agent_pb2_grpc.add_WorkerAgentServicer_to_server(
                    FakeAgent(self.state, w), s
                )
            )
            self.state.workers[worker.address] = worker

    async def _stop(self) -> None:
        for server in self._servers:
            await server.stop(None)
