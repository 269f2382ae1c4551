"""Directives over the real Directives stream: the test plays the AMM, agents run in process."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from amm.base.checksum import checksum
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.support.agent import (
    Stub,
    agents,
    dial,
    directive_stream,
    drop,
    get,
    new_id,
    poll,
    put,
    reason,
    replicate,
    running_agent,
    status,
)
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for
from worker_agent.store import Key

DATA = b"the value" * 1000
UNREACHABLE = "127.0.0.1:1"


async def test_drop_is_applied_once_a_holder_promises_to_keep() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        await put(stub_b, "k", DATA)
        async with directive_stream(stub_a) as amm:
            outcome = await amm.run(drop("k", [UNREACHABLE, b.address], checksum=checksum(DATA)))
        assert status(outcome) == "APPLIED", outcome.message
        assert b.address in outcome.message
        assert "k" not in a.store
        assert outcome.inventory_version == a.store.version
        assert [k.key for k in (await poll(stub_a)).keys] == []
        with _raises(grpc.StatusCode.FAILED_PRECONDITION):
            await stub_b.Delete(agent_pb2.DeleteRequest(key="k"))


async def test_drop_of_a_key_not_held_is_applied() -> None:
    async with running_agent() as a, dial(a.address) as stub, directive_stream(stub) as amm:
        outcome = await amm.run(drop("nothing", [UNREACHABLE]))
        assert (status(outcome), outcome.message) == ("APPLIED", "not held")


async def test_drop_is_refused_while_pinned() -> None:
    async with agents(2) as [(_, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        await put(stub_b, "k", DATA)
        await stub_a.Pin(agent_pb2.PinRequest(key="k"))
        async with directive_stream(stub_a) as amm:
            outcome = await amm.run(drop("k", [b.address]))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "PINNED")
            await stub_a.Unpin(agent_pb2.UnpinRequest(key="k"))
            assert status(await amm.run(drop("k", [b.address]))) == "APPLIED"


async def test_drop_is_refused_while_the_key_is_being_read() -> None:
    big = bytes(32 * 1024 * 1024)
    async with agents(2, chunk_size=64 * 1024) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", big, chunk_size=1024 * 1024)
        await put(stub_b, "k", big, chunk_size=1024 * 1024)
        reader = stub_a.Get(agent_pb2.GetRequest(key="k"))
        first = await reader.read()
        assert isinstance(first, agent_pb2.GetResponse)
        assert first.HasField("header")
        async with directive_stream(stub_a) as amm:
            outcome = await amm.run(drop("k", [b.address]))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "IN_USE")
            reader.cancel()
            await wait_for(lambda: a.store.in_use(Key("k")), lambda n: n == 0, what="read released")
            assert status(await amm.run(drop("k", [b.address]))) == "APPLIED"


async def test_drop_is_refused_when_no_holder_confirms() -> None:
    async with agents(2) as [(a, stub_a), (b, _)]:
        await put(stub_a, "k", DATA)
        async with directive_stream(stub_a) as amm:
            outcome = await amm.run(drop("k", [b.address, UNREACHABLE, a.address]))
            no_holder = await amm.run(drop("k", []))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "NO_CONFIRMED_HOLDER")
        assert f"{b.address}: NOT_HELD" in outcome.message
        assert f"{UNREACHABLE}: unreachable" in outcome.message
        assert reason(no_holder) == "INVALID", "a DROP naming no holder is malformed"
        assert "k" in a.store
        assert not a.store.is_dropping(Key("k")), "the mark is lifted after a refusal"


async def test_drop_is_refused_while_promised_to_a_peer() -> None:
    async with agents(2) as [(_, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        await put(stub_b, "k", DATA)
        lease = Duration(seconds=30)
        promise = await stub_a.PromiseKeep(
            agent_pb2.PromiseKeepRequest(key="k", checksum=checksum(DATA), lease=lease)
        )
        assert promise.kept
        assert promise.lease_expires.ToSeconds() > time.time() + 25
        async with directive_stream(stub_a) as amm:
            outcome = await amm.run(drop("k", [b.address]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "KEEP_PROMISED")
        with _raises(grpc.StatusCode.FAILED_PRECONDITION):
            await stub_a.Delete(agent_pb2.DeleteRequest(key="k"))


async def test_promise_keep_answers() -> None:
    async with running_agent(max_lease=5.0, lease=1.0) as a, dial(a.address) as stub:
        await put(stub, "k", DATA)
        missing = await stub.PromiseKeep(agent_pb2.PromiseKeepRequest(key="missing"))
        assert (missing.kept, reason(missing)) == (False, "NOT_HELD")
        other = await stub.PromiseKeep(
            agent_pb2.PromiseKeepRequest(key="k", checksum=checksum(b"other"))
        )
        assert (other.kept, reason(other)) == (False, "NOT_HELD")
        capped = await stub.PromiseKeep(
            agent_pb2.PromiseKeepRequest(key="k", lease=Duration(seconds=3600))
        )
        assert capped.kept
        assert capped.lease_expires.ToSeconds() <= time.time() + 6, "capped at max_lease"
        assert capped.lease.ToNanoseconds() == 5 * 10**9


async def test_promise_keep_refuses_leases_that_protect_nothing_and_caps_huge_ones() -> None:
    """A lease of zero or less answered kept=true yet protected nothing; a lease beyond what a
    timedelta holds failed with INTERNAL. Unset means the keeper's own lease."""
    async with running_agent(max_lease=5.0, lease=1.0) as a, dial(a.address) as stub:
        await put(stub, "k", DATA)
        for lease in (Duration(seconds=-10), Duration(), Duration(seconds=-(10**15))):
            with _raises(grpc.StatusCode.INVALID_ARGUMENT):
                await stub.PromiseKeep(agent_pb2.PromiseKeepRequest(key="k", lease=lease))
        assert (await stub.Delete(agent_pb2.DeleteRequest(key="k"))).deleted, "nothing promised"
        await put(stub, "k", DATA)
        huge = await stub.PromiseKeep(
            agent_pb2.PromiseKeepRequest(key="k", lease=Duration(seconds=10**15))
        )
        assert huge.kept
        assert huge.lease_expires.ToSeconds() <= time.time() + 6, "capped at max_lease"
        unset = await stub.PromiseKeep(agent_pb2.PromiseKeepRequest(key="k"))
        assert unset.kept


async def test_concurrent_drops_of_the_last_two_replicas_never_both_apply() -> None:
    """Each agent is told to drop its replica, naming the other as holder, at the same moment."""
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    async with (
        agents(2) as [(a, stub_a), (b, stub_b)],
        directive_stream(stub_a) as amm_a,
        directive_stream(stub_b) as amm_b,
    ):

        async def after(delay: float, coro: Any) -> types_pb2.DirectiveOutcome:
            await asyncio.sleep(delay)
            return await coro  # type: ignore[no-any-return]

        for i in range(30):
            key = f"race-{i}"
            await put(stub_a, key, DATA)
            await put(stub_b, key, DATA)
            jitter = (i % 5) * 0.001
            first, second = await asyncio.gather(
                after(0 if i % 2 else jitter, amm_a.run(drop(key, [b.address]))),
                after(jitter if i % 2 else 0, amm_b.run(drop(key, [a.address]))),
            )
            pair = (status(first), status(second))
            seen[pair] += 1
            assert pair != ("APPLIED", "APPLIED"), (first, second)
            assert key in a.store or key in b.store
            for outcome in (first, second):
                if status(outcome) != "APPLIED":
                    assert reason(outcome) in {"NO_CONFIRMED_HOLDER", "KEEP_PROMISED"}
    assert sum(seen.values()) == 30


async def test_replicate_fetches_verifies_and_keeps_the_key() -> None:
    async with agents(2, chunk_size=1000) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("k", DATA, [UNREACHABLE, a.address]))
            assert status(outcome) == "APPLIED", outcome.message
            assert outcome.inventory_version == b.store.version
            assert (await get(stub_b, "k"))[1] == DATA
            again = await amm.run(replicate("k", DATA, [a.address]))
            assert (status(again), again.message) == ("APPLIED", "already held")
        inventory = await poll(stub_b)
        assert [(k.key, k.checksum) for k in inventory.keys] == [("k", checksum(DATA))]


async def test_replicate_with_the_wrong_checksum_leaves_no_key() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        async with directive_stream(stub_b) as amm:
            wrong_sum = await amm.run(replicate("k", DATA, [a.address], checksum=checksum(b"x")))
            wrong_size = await amm.run(replicate("k", DATA, [a.address], size=len(DATA) + 1))
        assert status(wrong_sum) in {"REFUSED", "FAILED"}
        assert reason(wrong_sum) in {"CHECKSUM_MISMATCH", "SOURCE_UNAVAILABLE"}
        assert (status(wrong_size), reason(wrong_size)) == ("REFUSED", "CHECKSUM_MISMATCH")
        assert "k" not in b.store
        assert [k.key for k in (await poll(stub_b)).keys] == []


class _LyingAgent(agent_pb2_grpc.WorkerAgentServicer):
    """A peer that announces one checksum and sends other bytes."""

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        header = types_pb2.ValueHeader(key=request.key, size=len(DATA), checksum=checksum(DATA))
        yield agent_pb2.FetchResponse(header=header)
        yield agent_pb2.FetchResponse(chunk=b"X" * len(DATA))


async def test_replicate_from_a_corrupt_source_is_refused_checksum_mismatch() -> None:
    lying = _LyingAgent()  # type: ignore[abstract]
    async with fake_peer(lying) as liar, running_agent() as b, dial(b.address) as stub_b:
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("k", DATA, [liar]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "CHECKSUM_MISMATCH")
        assert "k" not in b.store
        with _raises(grpc.StatusCode.DATA_LOSS):
            await get(stub_b, "k", sources=[liar])
        assert "k" not in b.store


class _StrayHeaderAgent(agent_pb2_grpc.WorkerAgentServicer):
    """A peer that sends a second header in the middle of the value."""

    async def Fetch(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.FetchResponse]:
        header = types_pb2.ValueHeader(key=request.key, size=len(DATA), checksum=checksum(DATA))
        yield agent_pb2.FetchResponse(header=header)
        yield agent_pb2.FetchResponse(chunk=DATA[:100])
        yield agent_pb2.FetchResponse(header=header)
        yield agent_pb2.FetchResponse(chunk=DATA[100:])


async def test_a_source_that_breaks_the_stream_layout_is_refused_checksum_mismatch() -> None:
    """Header, then only chunks: anything else after the header was once read as an empty
    chunk; now the transfer is refused as corrupt."""
    async with (
        fake_peer(_StrayHeaderAgent()) as stray,  # type: ignore[abstract]
        running_agent() as b,
        dial(b.address) as stub_b,
    ):
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("k", DATA, [stray]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "CHECKSUM_MISMATCH")
        assert "holds no chunk" in outcome.message
        assert "k" not in b.store


class _SlowKeeper(agent_pb2_grpc.WorkerAgentServicer):
    """A peer that promises to keep every key for the lease asked, but answers only after
    ``delay`` seconds; with ``grant=False`` it says nothing of the lease, as an older agent."""

    def __init__(self, delay: float, *, grant: bool = True) -> None:
        self.delay = delay
        self.grant = grant
        self.asked = 0
        #: The lease asked in each request, in seconds.
        self.leases: list[float] = []

    async def PromiseKeep(self, request: Any, context: Any) -> agent_pb2.PromiseKeepResponse:
        self.asked += 1
        self.leases.append(request.lease.ToNanoseconds() / 1e9)
        await asyncio.sleep(self.delay)
        if not self.grant:
            return agent_pb2.PromiseKeepResponse(kept=True)
        return agent_pb2.PromiseKeepResponse(kept=True, lease=request.lease)


class _DelayingProxy(agent_pb2_grpc.WorkerAgentServicer):
    """Forwards PromiseKeep to a real agent and delays its answer (a slow network)."""

    def __init__(self, target: Stub, delay: float) -> None:
        self.target = target
        self.delay = delay

    async def PromiseKeep(self, request: Any, context: Any) -> agent_pb2.PromiseKeepResponse:
        answer = await self.target.PromiseKeep(request)
        await asyncio.sleep(self.delay)
        return answer


async def test_a_promise_that_arrives_too_late_is_not_relied_on() -> None:
    keeper = _SlowKeeper(0.3)  # type: ignore[abstract]
    async with fake_peer(keeper) as slow, running_agent(lease=0.4) as a, dial(a.address) as stub:
        await put(stub, "k", DATA)
        async with directive_stream(stub) as amm:
            outcome = await amm.run(drop("k", [slow]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "NO_CONFIRMED_HOLDER")
        assert "too late" in outcome.message
        assert "k" in a.store


async def test_the_lease_asked_grows_with_how_late_promises_come_back() -> None:
    """A keeper whose promises come back after half the configured lease (a loaded keeper or
    loop): the first drop is refused as too late, as before, but the agent then asks a lease
    that fits the round trip it measured, and the next drops are applied. With the configured
    lease alone, every drop was refused while the keeper answered well within its deadline."""
    keeper = _SlowKeeper(0.3)  # type: ignore[abstract]
    async with fake_peer(keeper) as slow, running_agent(lease=0.4) as a, dial(a.address) as stub:
        keys = [f"k{i}" for i in range(6)]
        for key in keys:
            await put(stub, key, DATA)
        async with directive_stream(stub) as amm:
            first = await amm.run(drop(keys[0], [slow]))
            assert (status(first), reason(first)) == ("REFUSED", "NO_CONFIRMED_HOLDER")
            assert "too late" in first.message
            assert keys[0] in a.store
            later = []
            for key in keys[1:]:  # the round trip may stretch on a loaded machine: a few tries
                later.append(await amm.run(drop(key, [slow])))
                if status(later[-1]) == "APPLIED":
                    break
        assert status(later[-1]) == "APPLIED", [o.message for o in later]
        assert keeper.leases[0] == pytest.approx(0.4), "the configured lease at first"
        assert keeper.leases[-1] >= 4 * 0.3, "then one that fits four round trips"
        assert keeper.leases[-1] <= 2.5 * a.config.promise_timeout, "within its bound"


async def test_a_drop_relies_on_the_lease_granted_not_the_one_asked() -> None:
    """The keeper caps the lease at 0.4 s where the requester asks 5 s, and its answer arrives
    0.3 s later: past half the granted lease, the promise may lapse before the drop is done (the
    keeper could then delete its copy too), so the drop is refused. On time, it is applied."""
    async with (
        running_agent(lease=5.0) as a,
        dial(a.address) as stub_a,
        running_agent(lease=0.4, max_lease=0.4) as b,
        dial(b.address) as stub_b,
    ):
        await put(stub_a, "k", DATA)
        await put(stub_b, "k", DATA)
        granted = await stub_b.PromiseKeep(
            agent_pb2.PromiseKeepRequest(key="k", lease=Duration(seconds=5))
        )
        assert granted.lease.ToNanoseconds() == 400_000_000, "the keeper says what it granted"
        proxy = _DelayingProxy(stub_b, 0.3)  # type: ignore[abstract]
        async with fake_peer(proxy) as slow_b, directive_stream(stub_a) as amm:
            late = await amm.run(drop("k", [slow_b], checksum=checksum(DATA)))
            assert (status(late), reason(late)) == ("REFUSED", "NO_CONFIRMED_HOLDER")
            assert "too late" in late.message
            assert "k" in a.store
            on_time = await amm.run(drop("k", [b.address], checksum=checksum(DATA)))
            assert status(on_time) == "APPLIED", on_time.message


async def test_a_promise_without_a_granted_lease_is_not_relied_on() -> None:
    """An older keeper answers kept=true without saying for how long: nothing to count on."""
    keeper = _SlowKeeper(0, grant=False)  # type: ignore[abstract]
    async with fake_peer(keeper) as old, running_agent() as a, dial(a.address) as stub:
        await put(stub, "k", DATA)
        async with directive_stream(stub) as amm:
            outcome = await amm.run(drop("k", [old]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "NO_CONFIRMED_HOLDER")
        assert f"{old}: kept but granted no lease" in outcome.message
        assert "k" in a.store


async def test_replicate_without_a_well_formed_checksum_is_refused_invalid() -> None:
    """Without a checksum the data was neither verified nor held to the announced size, so a
    value far over the memory limit was kept on the strength of a 10-byte announcement."""
    big = b"x" * 50_000
    async with running_agent() as a, dial(a.address) as stub_a:
        await put(stub_a, "big", big)
        async with running_agent(memory_limit=1000) as b, dial(b.address) as stub_b:
            async with directive_stream(stub_b) as amm:
                for bad in ("", checksum(big).upper(), "not-hex"):
                    outcome = await amm.run(
                        replicate("big", big, [a.address], size=10, checksum=bad)
                    )
                    assert (status(outcome), reason(outcome)) == ("REFUSED", "INVALID"), bad
            assert "big" not in b.store
            assert b.store.total_bytes == 0


async def test_peer_channels_are_bounded_and_eviction_spares_calls_in_progress() -> None:
    """Every address a caller named kept a channel open for good. Now the least recently used
    idle ones close beyond the bound, and a slow call keeps its channel while others come."""
    keeper = _SlowKeeper(0.3)  # type: ignore[abstract]
    async with (
        fake_peer(keeper) as slow,
        running_agent(max_peer_channels=2) as a,
        dial(a.address) as stub,
        directive_stream(stub) as amm,
    ):
        await put(stub, "k", DATA)
        await amm.send(drop("k", [slow]))
        await wait_for(lambda: keeper.asked, what="the slow promise asked")
        for port in range(1, 6):
            with _raises(grpc.StatusCode.UNAVAILABLE):
                await get(stub, "missing", sources=[f"127.0.0.1:{port}"])
            assert len(a.node.peers) <= 2
        outcome = await amm.outcome()
        assert status(outcome) == "APPLIED", outcome.message


async def test_a_keeper_dialled_again_after_its_channel_was_evicted_is_asked_anew() -> None:
    """Each channel's stub is kept for the calls that follow (making one per promise call cost
    a few percent of a dropping agent's CPU); once the channel is evicted, the next call to
    that keeper dials a new one and asks through it, not through the closed one's stub."""
    async with (
        agents(3, max_peer_channels=1) as [(a, stub_a), (b, stub_b), (c, stub_c)],
        directive_stream(stub_a) as amm,
    ):
        for key in ("k1", "k2", "k3"):
            await put(stub_a, key, DATA)
        await put(stub_b, "k1", DATA)
        await put(stub_b, "k3", DATA)
        await put(stub_c, "k2", DATA)
        for key, keeper in (("k1", b), ("k2", c), ("k3", b)):
            outcome = await amm.run(drop(key, [keeper.address]))
            assert status(outcome) == "APPLIED", (key, outcome.message)
            assert len(a.node.peers) <= 1
        assert not {"k1", "k2", "k3"} & set(a.store)


async def test_peers_are_named_host_port_only() -> None:
    """Callers name peers: the agent must not dial sockets or resolvers of their choosing."""
    bad = ["unix:/tmp/agent.sock", "dns:///peer:1", "a b:1", "::::", "peer", "peer:0"]
    async with running_agent() as a, dial(a.address) as stub:
        await put(stub, "k", DATA)
        for address in bad:
            with _raises(grpc.StatusCode.INVALID_ARGUMENT):
                await get(stub, "missing", sources=[address])
        async with directive_stream(stub) as amm:
            for address in bad:
                copy = await amm.run(replicate("other", DATA, [address]))
                assert (status(copy), reason(copy)) == ("REFUSED", "INVALID"), address
                assert "HOST:PORT" in copy.message
                dropped = await amm.run(drop("k", ["127.0.0.1:1", address]))
                assert (status(dropped), reason(dropped)) == ("REFUSED", "INVALID"), address
        assert len(a.node.peers) == 0, "nothing dialled"
        assert "k" in a.store


class _GatedKeeper(agent_pb2_grpc.WorkerAgentServicer):
    """A peer that promises to keep every key once ``opened`` is set."""

    def __init__(self) -> None:
        self.asked = 0
        self.opened = asyncio.Event()

    async def PromiseKeep(self, request: Any, context: Any) -> agent_pb2.PromiseKeepResponse:
        self.asked += 1
        await self.opened.wait()
        return agent_pb2.PromiseKeepResponse(kept=True, lease=request.lease)


async def test_holders_are_asked_at_once_and_the_first_promise_wins() -> None:
    """Asked in turn, a holder that never answers cost a whole promise_timeout before the next
    was asked; now all are asked at once and a prompt promise is not kept waiting."""
    silent = _GatedKeeper()  # type: ignore[abstract]
    async with (
        fake_peer(silent) as never,
        agents(2, promise_timeout=3.0) as [(a, stub_a), (b, stub_b)],
        directive_stream(stub_a) as amm,
    ):
        await put(stub_a, "k", DATA)
        await put(stub_b, "k", DATA)
        started = time.monotonic()
        outcome = await amm.run(drop("k", [never, b.address], checksum=checksum(DATA)))
        elapsed = time.monotonic() - started
        assert status(outcome) == "APPLIED", outcome.message
        assert b.address in outcome.message
        assert elapsed < 1.5, f"took {elapsed:.2f}s"
        assert "k" not in a.store


def directive_tasks() -> int:
    return sum(task.get_name().startswith("directive '") for task in asyncio.all_tasks())


async def test_a_directive_stream_reads_the_next_directive_only_when_a_slot_is_free() -> None:
    """Every directive read became a task at once: an AMM sending faster than they complete
    piled up tasks without limit."""
    keeper = _GatedKeeper()  # type: ignore[abstract]
    async with (
        fake_peer(keeper) as gated,
        running_agent(max_concurrent_directives=2) as a,
        dial(a.address) as stub,
        directive_stream(stub) as amm,
    ):
        for i in range(5):
            await put(stub, f"k{i}", DATA)
            await amm.send(drop(f"k{i}", [gated]))
        await wait_for(lambda: keeper.asked, lambda n: n == 2, what="two directives running")
        assert directive_tasks() == 2
        keeper.opened.set()
        outcomes = [await amm.outcome() for _ in range(5)]
        assert {status(o) for o in outcomes} == {"APPLIED"}
        assert keeper.asked == 5


async def test_replicate_from_nowhere_fails_source_unavailable() -> None:
    async with running_agent() as b, dial(b.address) as stub, directive_stream(stub) as amm:
        outcome = await amm.run(replicate("k", DATA, [UNREACHABLE]))
        assert (status(outcome), reason(outcome)) == ("FAILED", "SOURCE_UNAVAILABLE")
        no_source = await amm.run(replicate("k", DATA, []))
        assert (status(no_source), reason(no_source)) == ("REFUSED", "INVALID")


async def test_replicate_is_refused_while_paused() -> None:
    async with running_agent() as a, dial(a.address) as stub_a:
        await put(stub_a, "k", DATA)
        paused = {"memory_limit": 1024 * 1024, "pause_fraction": 0.01}
        async with running_agent(**paused) as b, dial(b.address) as stub_b:
            assert (await poll(stub_b)).status == types_pb2.WORKER_STATUS_PAUSED
            async with directive_stream(stub_b) as amm:
                outcome = await amm.run(replicate("k", DATA, [a.address]))
            assert (status(outcome), reason(outcome)) == ("REFUSED", "PAUSED")
            header, data = await get(stub_b, "k", sources=[a.address])
            assert data == DATA
            assert not header.replicated, "a paused worker serves but does not keep"
            assert "k" not in b.store


async def test_replicate_is_refused_over_the_memory_limit() -> None:
    async with agents(2, memory_limit=1000, pause_fraction=None) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", b"x" * 600)
        await put(stub_b, "other", b"y" * 600)
        async with directive_stream(stub_b) as amm:
            outcome = await amm.run(replicate("k", b"x" * 600, [a.address]))
        assert (status(outcome), reason(outcome)) == ("REFUSED", "MEMORY_LIMIT")
        assert "k" not in b.store


async def test_directives_are_idempotent_by_id() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        directive = replicate("k", DATA, [a.address])
        async with directive_stream(stub_b) as amm:
            first = await amm.run(directive)
            version = b.store.version
            second = await amm.run(directive)
            assert status(first) == status(second) == "APPLIED"
            assert (first.duplicate, second.duplicate) == (False, True)
            assert second.inventory_version == first.inventory_version == version
            assert b.store.version == version

            await put(stub_a, "k2", DATA)
            concurrent = replicate("k2", DATA, [a.address])
            await amm.send(concurrent)
            await amm.send(concurrent)
            outcomes = [await amm.outcome(), await amm.outcome()]
        assert sorted(o.duplicate for o in outcomes) == [False, True]
        assert {status(o) for o in outcomes} == {"APPLIED"}
        assert b.store.version == version + 1


async def test_stale_epoch_is_refused_after_a_poll_with_a_newer_epoch() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        assert (await poll(stub_b, epoch=5)).epoch == 5
        async with directive_stream(stub_b) as amm:
            stale = await amm.run(replicate("k", DATA, [a.address], epoch=4))
            assert (status(stale), reason(stale)) == ("REFUSED", "STALE_EPOCH")
            assert "k" not in b.store
            newer = await amm.run(replicate("k", DATA, [a.address], epoch=6))
            assert status(newer) == "APPLIED"
        assert (await poll(stub_b)).epoch == 6, "directives raise the epoch too"


async def test_the_epoch_is_judged_before_the_id_history_and_an_id_names_one_key_and_op() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put(stub_a, "k", DATA)
        await put(stub_a, "other", DATA)
        async with directive_stream(stub_b) as amm:
            first = await amm.run(replicate("k", DATA, [a.address], id="e5.1", epoch=5))
            assert status(first) == "APPLIED"
            reused = await amm.run(replicate("other", DATA, [a.address], id="e5.1", epoch=50))
            assert (status(reused), reason(reused), reused.duplicate) == (
                "REFUSED",
                "INVALID",
                False,
            )
            assert "reused for another key/op" in reused.message
            assert "other" not in b.store
            again = await amm.run(replicate("k", DATA, [a.address], id="e5.1", epoch=5))
            assert (status(again), again.duplicate) == ("APPLIED", True), "the first outcome stays"

            await poll(stub_b, epoch=6)  # a newer AMM took over
            stale = await amm.run(replicate("k", DATA, [a.address], id="e5.1", epoch=5))
            assert (status(stale), reason(stale), stale.duplicate) == (
                "REFUSED",
                "STALE_EPOCH",
                False,
            )

            malformed = types_pb2.Directive(id=new_id(), epoch=100, op=types_pb2.DIRECTIVE_OP_DROP)
            assert reason(await amm.run(malformed)) == "INVALID"
        assert (await poll(stub_b)).epoch == 6, "an invalid directive's epoch is not news"


async def test_malformed_directives_are_refused_invalid() -> None:
    async with running_agent() as a, dial(a.address) as stub, directive_stream(stub) as amm:
        unknown_op = types_pb2.Directive(id=new_id(), key="k")
        no_key = types_pb2.Directive(id=new_id(), op=types_pb2.DIRECTIVE_OP_DROP, holders=["x:1"])
        for directive in (unknown_op, no_key):
            outcome = await amm.run(directive)
            assert (status(outcome), reason(outcome)) == ("REFUSED", "INVALID")


async def test_directive_stream_ends_when_the_agent_stops() -> None:
    async with running_agent() as a, dial(a.address) as stub, directive_stream(stub) as amm:
        await amm.run(drop("k", ["x:1"]))
        started = time.monotonic()
        await a.stop()
        assert await amm.next_response(within=2) is None
        assert time.monotonic() - started < 1.5


async def test_directive_stream_ends_once_the_amm_stops_sending() -> None:
    async with running_agent() as a, dial(a.address) as stub, directive_stream(stub) as amm:
        await amm.send(drop("k", ["x:1"]))
        amm.done_writing()
        assert (await amm.outcome()).message == "not held"
        assert await amm.next_response() is None
        assert a.store.version == 0


@contextmanager
def _raises(code: grpc.StatusCode) -> Iterator[None]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        yield
    assert err.value.code() == code, err.value
