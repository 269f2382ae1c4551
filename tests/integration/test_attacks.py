"""Issue 9's attacks, replayed without TLS: a real AMM and real agents on loopback, and raw stubs
playing the attacker. Each test failed against the code before the fix it names."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.base.validation import MAX_ADOPTED_EPOCH, MAX_EPOCH
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.runtime.records.state import EPOCH_STEP, FIRST_EPOCHS, StateError, StateStore
from tests.conftest import amm_config
from tests.support.agent import (
    Stub,
    agents,
    directive_stream,
    drop,
    get,
    poll,
    put,
    reason,
    replicate,
    status,
)
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig
from worker_agent.store import Key

if TYPE_CHECKING:
    from amm.v1.control_pb2_grpc import ActiveMemoryManagerAsyncStub

DATA = b"the real value " * 100
FAKE = b"the attacker's bytes " * 100


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


@dataclass
class Cluster:
    """A real AMM (cycles stopped) and real agents registered with it, with stubs to each."""

    amm: AmmServer
    control: ActiveMemoryManagerAsyncStub
    agents: list[Agent]
    stubs: list[Stub]

    @property
    def addresses(self) -> list[str]:
        return [a.address for a in self.agents]

    async def holders(self, key: str) -> set[str]:
        resp = await self.control.WhoHas(control_pb2.WhoHasRequest(keys=[key], fresh=True))
        return set(resp.entries[0].workers)

    async def run_once(self) -> types_pb2.CycleReport:
        return (await self.control.RunOnce(control_pb2.RunOnceRequest(wait=True))).cycle


@asynccontextmanager
async def cluster(
    tmp_path: Path, n: int, agent_config: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(
            AmmServer(amm_config(tmp_path, measure="managed", **overrides))
        )
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS)
        )
        control = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        pairs = await stack.enter_async_context(agents(n, amm=amm.address, **(agent_config or {})))

        async def registered() -> int:
            return len((await control.ListWorkers(control_pb2.ListWorkersRequest())).workers)

        await wait_for(registered, lambda count: count == n, what="agents registered")
        yield Cluster(amm, control, [a for a, _ in pairs], [s for _, s in pairs])


# -- 1. One call with a huge epoch locks the AMM out ------------------------------------------


async def test_a_strangers_epoch_neither_fences_the_amm_off_nor_is_taken(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        a, b = c.stubs
        await put(a, "x", DATA)
        await get(b, "x", sources=[c.addresses[0]])
        # The attacker polls with the largest epoch there is, and beyond it...
        for stub in c.stubs:
            await poll(stub, epoch=MAX_EPOCH)
            code, details = await _code(stub.Poll(agent_pb2.PollRequest(epoch=2**63)))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "out of range" in details
        # ...and sends directives of an epoch the AMM never issued, on its own stream.
        async with directive_stream(b) as attacker:
            for epoch in (c.amm.epoch + 1, MAX_ADOPTED_EPOCH, MAX_EPOCH):
                outcome = await attacker.run(drop("x", [c.addresses[0]], epoch=epoch))
                assert (status(outcome), reason(outcome)) == ("REFUSED", "UNCONFIRMED_EPOCH")
                assert f"newer than epoch {c.amm.epoch}" in outcome.message
            outcome = await attacker.run(drop("x", [c.addresses[0]], epoch=2**63))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "INVALID")
        for stub in c.stubs:
            assert (await poll(stub)).epoch == c.amm.epoch
        # The real AMM still acts: ReduceReplicas drops one of the two copies.
        report = await c.run_once()
        assert (report.directives_sent, report.applied) == (1, 1)
        assert len(await c.holders("x")) == 1


async def test_the_amm_epoch_stays_bounded_and_keeps_increasing(tmp_path: Path) -> None:
    config = amm_config(tmp_path)
    async with (
        AmmServer(config) as amm,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        for epoch in (2**63, 2**64 - 1, MAX_ADOPTED_EPOCH + 1):
            request = control_pb2.RegisterWorkerRequest(
                address="127.0.0.1:5000", incarnation="i", epoch=epoch
            )
            code, details = await _code(stub.RegisterWorker(request))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "out of range" in details
        first = amm.epoch
        assert first <= FIRST_EPOCHS, "not moved by the refused registrations"
        # A fresh AMM does move past the highest epoch a registration may claim...
        await stub.RegisterWorker(
            control_pb2.RegisterWorkerRequest(
                address="127.0.0.1:5000", incarnation="i", epoch=MAX_ADOPTED_EPOCH
            )
        )
        assert amm.epoch == MAX_ADOPTED_EPOCH + 1
    # ...and every later start still begins a new, higher epoch.
    previous = MAX_ADOPTED_EPOCH + 1
    for _ in range(2):
        async with AmmServer(config) as amm:
            assert previous < amm.epoch <= previous + EPOCH_STEP
            previous = amm.epoch
    # A state file at the end of the range (only a hand-edited or pre-bound one gets there)
    # stops the AMM with a message, not an OverflowError at every start.
    with StateStore(config.state_path) as store:
        store._run("UPDATE service SET epoch = ?", MAX_EPOCH - EPOCH_STEP + 1)
        with pytest.raises(StateError, match="Move it aside"):
            store.begin_epoch()


# -- 6. RegisterWorker takes what the agent's own flags refuse --------------------------------


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"address": "h" * 300 + ":5000"}, "must be HOST:PORT"),
        ({"address": "unix:/tmp/sock:1"}, "must be HOST:PORT"),
        ({"zone": "rack a"}, "zone must not contain whitespace"),
        ({"zone": "rack\na"}, "zone must not contain whitespace"),
        ({"name": "w\n1"}, "name must hold printable characters"),
        ({"name": "n" * 300}, "name must be at most 256"),
        ({"incarnation": "x\ny"}, "incarnation must be"),
    ],
)
async def test_registration_refuses_what_the_agent_flags_refuse(
    tmp_path: Path, fields: dict[str, str], words: str
) -> None:
    request: dict[str, Any] = {
        "address": "127.0.0.1:5000",
        "name": "w1",
        "incarnation": "i1",
        **fields,
    }
    agent_fields = {
        "advertise": request["address"],
        "name": request["name"],
        "zone": request.get("zone", ""),
    }
    if "incarnation" not in fields:  # the agent's flags have no incarnation: it makes its own
        with pytest.raises(ValueError, match=words):
            AgentConfig(**agent_fields)
    async with (
        AmmServer(amm_config(tmp_path)) as amm,
        grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        code, details = await _code(
            stub.RegisterWorker(control_pb2.RegisterWorkerRequest(**request))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert words in details
        listed = await stub.ListWorkers(control_pb2.ListWorkersRequest())
        assert not listed.workers


class Liar(agent_pb2_grpc.WorkerAgentServicer):
    """The attacker's own server: promises to keep anything, serves its own bytes under any
    key, and counts how often an agent called it."""

    def __init__(self) -> None:
        self.calls = 0

    async def PromiseKeep(
        self, request: agent_pb2.PromiseKeepRequest, context: Any
    ) -> agent_pb2.PromiseKeepResponse:
        self.calls += 1
        return agent_pb2.PromiseKeepResponse(kept=True, lease=Duration(seconds=60))

    async def PromiseKeepBatch(
        self, request: agent_pb2.PromiseKeepBatchRequest, context: Any
    ) -> agent_pb2.PromiseKeepBatchResponse:
        self.calls += 1
        kept = agent_pb2.PromiseKeepResponse(kept=True, lease=Duration(seconds=60))
        return agent_pb2.PromiseKeepBatchResponse(answers=[kept] * len(request.items))

    async def Fetch(
        self, request: agent_pb2.FetchRequest, context: Any
    ) -> AsyncIterator[agent_pb2.FetchResponse]:
        self.calls += 1
        header = types_pb2.ValueHeader(key=request.key, size=len(FAKE), checksum=checksum(FAKE))
        yield agent_pb2.FetchResponse(header=header)
        yield agent_pb2.FetchResponse(chunk=FAKE)


async def _epoch(c: Cluster) -> int:
    """What an attacker reads off the AMM: its current epoch."""
    return (await c.control.GetStatus(control_pb2.GetStatusRequest())).epoch


# -- 2. A DROP naming a fake keeper removes the last copy --------------------------------------


async def test_a_drop_is_never_kept_by_a_keeper_the_amm_does_not_list(tmp_path: Path) -> None:
    liar = Liar()  # type: ignore[abstract]
    async with cluster(tmp_path, 2) as c, fake_peer(liar) as fake:
        a = c.stubs[0]
        await put(a, "x", DATA)
        many = [Key(f"k{i:04d}") for i in range(2_000)]
        for key in many:  # set-up only: the last copies of 2,000 more keys
            c.agents[0].store.add(key, DATA, checksum(DATA))
        assert await c.holders("x") == {c.addresses[0]}
        epoch = await _epoch(c)
        async with directive_stream(a) as attacker:
            outcome = await attacker.run(drop("x", [fake], epoch=epoch, checksum=checksum(DATA)))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "UNKNOWN_PEER")
            assert fake in outcome.message
            # A registered worker that does not hold the key refuses to promise it.
            outcome = await attacker.run(drop("x", [fake, c.addresses[1]], epoch=epoch))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "NO_CONFIRMED_HOLDER")
            # A batch of thousands is judged against the AMM's list at once.
            await attacker.send_batch([drop(key, [fake], epoch=epoch) for key in many])
            refused: list[types_pb2.DirectiveOutcome] = []
            while len(refused) < len(many):
                response = await attacker.next_response()
                assert response is not None
                refused += response.batch
            assert {reason(o) for o in refused} == {"UNKNOWN_PEER"}
        assert liar.calls == 0
        assert (await poll(a)).keys[0].key == "k0000"
        assert len(c.agents[0].store) == len(many) + 1


# -- 3. Get and REPLICATE sources point anywhere -----------------------------------------------


async def test_sources_must_be_registered_workers(tmp_path: Path) -> None:
    liar = Liar()  # type: ignore[abstract]
    async with cluster(tmp_path, 2) as c, fake_peer(liar) as fake:
        a, b = c.stubs
        await put(a, "x", DATA)
        # The attacker's server as a Get source, to plant its bytes under x on b...
        code, details = await _code(get(b, "x", sources=[fake]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert f"not registered: {fake!r}" in details
        # ...or as a REPLICATE source, under the checksum of its own bytes.
        async with directive_stream(b) as attacker:
            outcome = await attacker.run(replicate("x", FAKE, [fake], epoch=await _epoch(c)))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "UNKNOWN_PEER")
        # Probing ports from the agent's position: open or closed, the answer is the same and
        # nothing is dialled.
        for probe in (fake, "127.0.0.1:1", "10.255.255.1:22"):
            code, details = await _code(get(b, "y", sources=[probe]))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "sources must be workers registered with the AMM" in details
        assert liar.calls == 0
        assert not c.agents[1].store
        # A registered worker is a good source.
        header, data = await get(b, "x", sources=[c.addresses[0]])
        assert (data, header.replicated) == (DATA, True)


async def test_a_fetched_replica_never_shadows_the_keys_content(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as c:
        a, b, _ = c.stubs
        await put(a, "x", DATA)
        assert await c.holders("x") == {c.addresses[0]}
        # A registered worker holds other content under x (a conflict from before keys were
        # immutable cluster-wide, or two puts within one poll interval): set-up only.
        c.agents[2].store.add(Key("x"), FAKE, checksum(FAKE))
        assert await c.holders("x") == {c.addresses[0], c.addresses[2]}
        code, details = await _code(get(b, "x", sources=[c.addresses[2]]))
        assert code is grpc.StatusCode.NOT_FOUND
        assert "holds other content" in details
        assert "x" not in c.agents[1].store
        # Named first, the odd copy is passed over for the key's content.
        header, data = await get(b, "x", sources=[c.addresses[2], c.addresses[0]])
        assert (data, header.checksum) == (DATA, checksum(DATA))
        assert c.agents[1].store.get(Key("x")) is not None


# -- 4. A Put on another agent stores the attacker's bytes under a real key -------------------


async def test_a_put_never_shadows_a_key_held_elsewhere(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        a, b = c.stubs
        await put(a, "x", DATA)
        assert await c.holders("x") == {c.addresses[0]}
        # Other content under x, with and without a checksum in the header, and in a PutMany.
        for with_checksum in (True, False):
            code, details = await _code(put(b, "x", FAKE, with_checksum=with_checksum))
            assert code is grpc.StatusCode.ALREADY_EXISTS
            assert "already exists in the cluster with other content" in details
            assert c.addresses[0] in details
        items = [
            agent_pb2.PutItem(key="fresh", data=b"new"),
            agent_pb2.PutItem(key="x", data=FAKE),
        ]
        code, details = await _code(b.PutMany(iter([agent_pb2.PutManyRequest(items=items)])))
        assert code is grpc.StatusCode.ALREADY_EXISTS
        assert not c.agents[1].store  # a message is stored whole or not at all
        # The key's own content is a copy like any other.
        assert (await put(b, "x", DATA)).created
        assert await c.holders("x") == set(c.addresses)


# -- 5. Cheap denial of service -----------------------------------------------------------------

#: A RegisterWorkerRequest / PollRequest / GetRequest whose string field 1 (address, key) or 6
#: (cursor) is not UTF-8: protobuf refuses to decode it.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
POLL_NOT_UTF8 = b"\x32\x02\xff\xfe"


def _garbled_directive(directive_id: str) -> bytes:
    """A Directive whose id reads but whose key (field 4) is not UTF-8."""
    raw_id = directive_id.encode()
    return b"\x0a" + bytes([len(raw_id)]) + raw_id + b"\x22\x02\xff\xfe"


def _raw(channel: grpc.aio.Channel, kind: str, method: str, decode: Any = None) -> Any:
    """A call of ``method`` that sends bytes as given: the attacker's own encoding."""
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=decode)


def _field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


async def test_undecodable_requests_are_invalid_and_logged_once_per_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        cluster(tmp_path, 1) as c,
        grpc.aio.insecure_channel(c.amm.address) as to_amm,
        grpc.aio.insecure_channel(c.addresses[0]) as to_agent,
    ):
        calls = [
            _raw(to_amm, "unary_unary", "/amm.v1.ActiveMemoryManager/RegisterWorker")(NOT_UTF8),
            _raw(to_amm, "unary_unary", "/amm.v1.ActiveMemoryManager/WhoHas")(NOT_UTF8),
            _raw(to_agent, "unary_unary", "/amm.v1.WorkerAgent/Poll")(POLL_NOT_UTF8),
            _raw(to_agent, "stream_unary", "/amm.v1.WorkerAgent/Put")(iter([_field(1, NOT_UTF8)])),
            _raw(to_agent, "stream_unary", "/amm.v1.WorkerAgent/PutMany")(
                iter([_field(1, NOT_UTF8)])
            ),
        ]
        for call in calls:
            code, details = await _code(call)
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "undecodable" in details
            assert "UTF-8" in details
        get = _raw(to_agent, "unary_stream", "/amm.v1.WorkerAgent/Get")
        code, details = await _code(_drain(get(NOT_UTF8)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        # A flood from one client: every call answered, one log line per server.
        started = time.monotonic()
        flood = [
            *(
                _code(_raw(to_amm, "unary_unary", "/amm.v1.ActiveMemoryManager/GetStatus")(b"\x80"))
                for _ in range(200)
            ),
            *(
                _code(_raw(to_agent, "unary_unary", "/amm.v1.WorkerAgent/Poll")(POLL_NOT_UTF8))
                for _ in range(200)
            ),
        ]
        codes = {code for code, _ in await asyncio.gather(*flood)}
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        assert time.monotonic() - started < 10
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert sorted({r.name for r in lines}) == ["amm_service.api.server", "worker_agent.servicer"]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def test_every_directive_is_answered_even_an_undecodable_one(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path, 1) as c,
        grpc.aio.insecure_channel(c.addresses[0]) as channel,
    ):
        epoch = await _epoch(c)
        good = drop("gone", [c.addresses[0]], id="good", epoch=epoch).SerializeToString()
        messages = [
            _field(1, _garbled_directive("one")),
            _field(2, _garbled_directive("in-batch")) + _field(2, good),
            _field(1, b"\x22\x02\xff\xfe"),  # no id at all: nothing to answer to
        ]
        stream = _raw(
            channel,
            "stream_stream",
            "/amm.v1.WorkerAgent/Directives",
            agent_pb2.DirectivesResponse.FromString,
        )(iter(messages))
        answered: dict[str, types_pb2.DirectiveOutcome] = {}

        async def read_all() -> None:
            async for response in stream:
                single = [response.outcome] if response.HasField("outcome") else []
                for outcome in [*response.batch, *single]:
                    answered[outcome.directive_id] = outcome

        code, details = await _code(read_all())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "without a readable id" in details
        assert sorted(answered) == ["good", "in-batch", "one"]
        for name in ("one", "in-batch"):
            assert (status(answered[name]), reason(answered[name])) == ("REFUSED", "INVALID")
            assert "undecodable directive" in answered[name].message
        assert status(answered["good"]) == "APPLIED"  # not held: nothing to drop


class Silent(agent_pb2_grpc.WorkerAgentServicer):
    """A source that answers polls but never sends a value."""

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return agent_pb2.PollResponse(
            incarnation="silent", version=1, full=True, status=types_pb2.WORKER_STATUS_PAUSED
        )

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        await asyncio.Event().wait()
        yield agent_pb2.FetchResponse()  # pragma: no cover


async def test_rogue_directives_with_silent_sources_do_not_delay_the_amms(tmp_path: Path) -> None:
    silent = Silent()  # type: ignore[abstract]
    async with (
        cluster(tmp_path, 2, directive_timeout="3s") as c,
        fake_peer(silent) as nowhere,
    ):
        a, b = c.stubs
        await put(a, "x", DATA)
        epoch = await _epoch(c)
        async with directive_stream(b) as attacker:
            for n in range(20):
                await attacker.send(replicate(f"rogue-{n}", FAKE, [nowhere], epoch=epoch))
            # The AMM's own directive to b: a copy of x for a goal of two.
            await c.control.Replicate(control_pb2.ReplicateRequest(keys=["x"], n=2))
            started = time.monotonic()
            report = await c.run_once()
            assert time.monotonic() - started < 2.5
            assert (report.directives_sent, report.applied) == (1, 1)
            rogue = [await attacker.outcome() for _ in range(20)]
            assert {reason(o) for o in rogue} == {"UNKNOWN_PEER"}


async def test_a_silent_registered_source_is_given_up_on_quickly(tmp_path: Path) -> None:
    silent = Silent()  # type: ignore[abstract]
    async with (
        cluster(tmp_path, 2, agent_config={"source_timeout": 0.5}) as c,
        fake_peer(silent) as nowhere,
    ):
        a, b = c.stubs
        await put(a, "x", DATA)
        # Without authentication anyone can register a worker: here, the silent server.
        await c.control.RegisterWorker(
            control_pb2.RegisterWorkerRequest(address=nowhere, incarnation="silent")
        )
        async with directive_stream(b) as amm_like:
            started = time.monotonic()
            directive = replicate("x", DATA, [nowhere, c.addresses[0]], epoch=await _epoch(c))
            outcome = await amm_like.run(directive)
            assert status(outcome) == "APPLIED"
            assert time.monotonic() - started < 3
        assert f"replicated from {c.addresses[0]}" in outcome.message


# -- 7. Delete and Close(force) remove the last copy silently ----------------------------------


async def test_a_delete_never_removes_the_last_copy(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        a, b = c.stubs
        await put(a, "x", DATA)
        code, details = await _code(a.Delete(agent_pb2.DeleteRequest(key="x")))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "only copy" in details
        assert "amm forget" in details
        # A replica of a key held elsewhere goes, once the other holder promised to keep it;
        # then the other holder's copy is the last one.
        await put(a, "y", DATA)
        await get(b, "y", sources=[c.addresses[0]])
        assert (await a.Delete(agent_pb2.DeleteRequest(key="y"))).deleted
        code, details = await _code(b.Delete(agent_pb2.DeleteRequest(key="y")))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert await c.holders("x") == {c.addresses[0]}
        assert await c.holders("y") == {c.addresses[1]}
        # The AMM's Forget still deletes a key everywhere.
        assert (
            await c.control.Forget(control_pb2.ForgetRequest(keys=["x", "y"]))
        ).replicas_deleted == 2


async def test_two_deletes_of_the_last_two_copies_do_not_both_succeed(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        a, b = c.stubs
        await put(a, "x", DATA)
        await get(b, "x", sources=[c.addresses[0]])
        assert await c.holders("x") == set(c.addresses)
        results = await asyncio.gather(
            *(stub.Delete(agent_pb2.DeleteRequest(key="x")) for stub in c.stubs),
            return_exceptions=True,
        )
        assert sum(isinstance(r, grpc.aio.AioRpcError) for r in results) >= 1
        assert await c.holders("x")


async def test_a_forced_close_says_how_many_keys_it_loses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(tmp_path, 2) as c:
        a, b = c.stubs
        await put(a, "only-here", DATA)
        await put(a, "shared", DATA)
        await get(b, "shared", sources=[c.addresses[0]])
        await c.holders("shared")  # the AMM has seen both copies
        reply = await a.Close(agent_pb2.CloseRequest(reason="attack", force=True))
        assert (reply.closing, reply.keys_lost) == (True, 1)
        await asyncio.wait_for(c.agents[0].stopped.wait(), 5)
    (warning,) = [r for r in caplog.records if "are lost" in r.getMessage()]
    assert "2 key(s) held, 1 of them with no copy on another worker" in warning.getMessage()
