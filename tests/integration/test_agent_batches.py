"""Directive batches and batched keep-promises, over real Directives streams and real agents.

The test plays the AMM; agents run in process. A counting proxy in front of a real keeper shows
how many promise calls a batch of drops costs.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc
import pytest

from amm.base.checksum import checksum
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.support.agent import (
    Stub,
    agents,
    dial,
    directive_stream,
    drop,
    poll,
    put,
    reason,
    replicate,
    status,
)
from tests.support.faults import fake_peer
from worker_agent.store import Key

DATA = b"batched" * 100
DIGEST = checksum(DATA)


async def _run_batch(stub: Stub, directives: list[types_pb2.Directive]) -> list[Any]:
    """Send ``directives`` as one batch message; the outcomes, each once, in arrival order."""
    outcomes: list[types_pb2.DirectiveOutcome] = []
    async with directive_stream(stub) as amm:
        await amm.send_batch(directives)
        while len(outcomes) < len(directives):
            response = await amm.next_response(within=20)
            assert response is not None, "the stream ended before every outcome"
            assert not response.HasField("outcome"), "a batch is answered with batches"
            outcomes.extend(response.batch)
    assert sorted(o.directive_id for o in outcomes) == sorted(d.id for d in directives)
    return outcomes


class _CountingKeeper(agent_pb2_grpc.WorkerAgentServicer):
    """Forwards keep-promise calls to a real agent and counts them."""

    def __init__(self, target: Stub) -> None:
        self.target = target
        self.calls: collections.Counter[str] = collections.Counter()
        self.items = 0

    async def PromiseKeep(self, request: Any, context: Any) -> agent_pb2.PromiseKeepResponse:
        self.calls["PromiseKeep"] += 1
        return await self.target.PromiseKeep(request)

    async def PromiseKeepBatch(
        self, request: Any, context: Any
    ) -> agent_pb2.PromiseKeepBatchResponse:
        self.calls["PromiseKeepBatch"] += 1
        self.items += len(request.items)
        return await self.target.PromiseKeepBatch(request)


async def test_a_batch_of_drops_asks_its_keeper_once() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"k{i}" for i in range(200)]
        for key in keys:
            await put(stub_a, key, DATA)
            await put(stub_b, key, DATA)
        counting = _CountingKeeper(stub_b)  # type: ignore[abstract]
        async with fake_peer(counting) as keeper:
            outcomes = await _run_batch(
                stub_a, [drop(key, [keeper], checksum=DIGEST) for key in keys]
            )
        assert {status(o) for o in outcomes} == {"APPLIED"}
        assert counting.calls == {"PromiseKeepBatch": 1}
        assert counting.items == len(keys)
        assert not any(key in a.store for key in keys)
        assert all(key in b.store for key in keys)
        # The keeper keeps its promise: its copies cannot be dropped during the lease.
        refused = await _run_batch(stub_b, [drop(keys[0], [a.address], checksum=DIGEST)])
        assert reason(refused[0]) in {"KEEP_PROMISED", "NO_CONFIRMED_HOLDER"}
        assert keys[0] in b.store


async def _put_many(stub: Stub, keys: list[str]) -> None:
    items = [agent_pb2.PutItem(key=key, data=DATA) for key in keys]
    await stub.PutMany(iter([agent_pb2.PutManyRequest(items=items)]))


async def test_a_keepers_mixed_answers_settle_each_drop_by_its_own_answer() -> None:
    """Runs of kept and refused keys, some across the keeper's slices of promises: each drop is
    applied exactly when the keeper promised its key (its answers are built, and read, a run
    of alike answers at a time)."""
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"mixed-{i:04d}" for i in range(900)]
        missing = {*range(100, 110), 255, 256, 511, *range(600, 780), 899}
        await _put_many(stub_a, keys)
        await _put_many(stub_b, [key for i, key in enumerate(keys) if i not in missing])
        directives = [drop(key, [b.address]) for key in keys]
        outcomes = await _run_batch(stub_a, directives)
        key_of = {d.id: d.key for d in directives}
        applied = {key_of[o.directive_id] for o in outcomes if status(o) == "APPLIED"}
        kept = {key for i, key in enumerate(keys) if i not in missing}
        assert applied == kept
        assert {key for key in keys if key not in a.store} == kept
        assert all(key in a.store for i, key in enumerate(keys) if i in missing), "last copy"
        refused = [o for o in outcomes if status(o) != "APPLIED"]
        assert {reason(o) for o in refused} == {"NO_CONFIRMED_HOLDER"}
        assert all("NOT_HELD" in o.message for o in refused)


async def test_siblings_dropping_in_one_batch_each_never_drop_the_last_copies() -> None:
    """Each agent drops its whole inventory in one batch, naming the other as keeper, at the
    same moment: for every key at most one drop applies."""
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"race-{i}" for i in range(300)]
        for key in keys:
            await put(stub_a, key, DATA)
            await put(stub_b, key, DATA)
        first, second = await asyncio.gather(
            _run_batch(stub_a, [drop(key, [b.address], checksum=DIGEST) for key in keys]),
            _run_batch(stub_b, [drop(key, [a.address], checksum=DIGEST) for key in keys]),
        )
        by_key = {o.directive_id: o for o in [*first, *second]}
        assert len(by_key) == 2 * len(keys)
        for key in keys:
            assert key in a.store or key in b.store, f"{key} lost"
        for outcome in [*first, *second]:
            if status(outcome) != "APPLIED":
                assert reason(outcome) in {"NO_CONFIRMED_HOLDER", "KEEP_PROMISED", "DROPPING"}


async def test_a_mixed_batch_answers_every_directive_as_if_sent_alone() -> None:
    async with agents(3) as [(a, stub_a), (b, stub_b), (_, stub_c)]:
        await put(stub_a, "dropped", DATA)
        await put(stub_b, "dropped", DATA)
        await put(stub_b, "copied", DATA)
        await put(stub_a, "pinned", DATA)
        await put(stub_b, "pinned", DATA)
        await stub_a.Pin(agent_pb2.PinRequest(key="pinned"))
        repeated = drop("dropped", [b.address], checksum=DIGEST)
        batch = [
            repeated,
            replicate("copied", DATA, [b.address]),
            drop("pinned", [b.address], checksum=DIGEST),
            drop("", [b.address]),  # malformed
            drop("dropped", [b.address], checksum=DIGEST),  # the same key under another id
            drop("absent", [b.address]),
        ]
        outcomes = {o.directive_id: o for o in await _run_batch(stub_a, batch)}
        assert status(outcomes[batch[0].id]) == "APPLIED"
        assert status(outcomes[batch[1].id]) == "APPLIED"
        assert reason(outcomes[batch[2].id]) == "PINNED"
        assert reason(outcomes[batch[3].id]) == "INVALID"
        assert status(outcomes[batch[4].id]) in {"APPLIED", "REFUSED"}
        assert (status(outcomes[batch[5].id]), outcomes[batch[5].id].message) == (
            "APPLIED",
            "not held",
        )
        assert ("copied" in a.store, "pinned" in a.store, "dropped" in a.store) == (
            True,
            True,
            False,
        )
        # Idempotent by id, also across batches: the repeated id is answered, not run again.
        again = await _run_batch(stub_a, [repeated])
        assert (again[0].duplicate, status(again[0])) == (True, "APPLIED")
        assert [k.key for k in (await poll(stub_c)).keys] == []


async def test_promise_keep_batch_answers_each_item_in_order() -> None:
    async with agents(1) as [(_, stub)]:
        await put(stub, "held", DATA)
        request = agent_pb2.PromiseKeepBatchRequest(
            items=[
                agent_pb2.KeepItem(key="held", checksum=DIGEST),
                agent_pb2.KeepItem(key="absent"),
                agent_pb2.KeepItem(key="held", checksum=checksum(b"other")),
            ],
            requester="test",
        )
        answers = (await stub.PromiseKeepBatch(request)).answers
        assert [answer.kept for answer in answers] == [True, False, False]
        assert [reason(answer) for answer in answers[1:]] == ["NOT_HELD", "NOT_HELD"]
        assert answers[0].lease.ToNanoseconds() > 0


async def test_a_promise_batch_with_one_malformed_item_promises_nothing() -> None:
    """Items are checked a part at a time as a whole; one malformed item anywhere in thousands
    (an empty or too long key, a checksum that is not 64 lowercase hex digits) fails the call
    INVALID_ARGUMENT before anything is promised."""
    async with agents(1) as [(agent, stub)]:
        keys = [f"promised-{i:05d}" for i in range(3000)]
        await _put_many(stub, keys)
        good = [agent_pb2.KeepItem(key=key, checksum=DIGEST) for key in keys]
        bad_items = [
            agent_pb2.KeepItem(key="", checksum=DIGEST),
            agent_pb2.KeepItem(key="k" * 1025, checksum=DIGEST),
            agent_pb2.KeepItem(key=keys[0], checksum="g" * 64),
            agent_pb2.KeepItem(key=keys[0], checksum=DIGEST[:-1]),
        ]
        for bad in bad_items:
            for at in (0, 1500, 3000):
                request = agent_pb2.PromiseKeepBatchRequest(
                    items=[*good[:at], bad, *good[at:]], requester="test"
                )
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.PromiseKeepBatch(request)
                assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert not any(agent.store.promised_until(Key(key), 0.0) for key in keys)
        # An uppercase checksum is the same checksum (taken in lowercase), in any part.
        upper = agent_pb2.KeepItem(key=keys[1], checksum=DIGEST.upper())
        request = agent_pb2.PromiseKeepBatchRequest(items=[*good, upper], requester="test")
        answers = (await stub.PromiseKeepBatch(request)).answers
        assert len(answers) == len(keys) + 1
        assert all(answer.kept for answer in answers)


async def test_agents_report_their_features() -> None:
    async with agents(1) as [(a, stub)], dial(a.address) as again:
        features = set((await poll(again)).features)
        assert {"directive-batches", "keep-batches"} <= features
        assert (await poll(stub)).features == (await poll(again)).features


class _GatedKeeper(_CountingKeeper):
    """A real keeper that answers PromiseKeepBatch only once ``gate`` is set."""

    def __init__(self, target: Stub) -> None:
        super().__init__(target)
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()

    async def PromiseKeepBatch(
        self, request: Any, context: Any
    ) -> agent_pb2.PromiseKeepBatchResponse:
        self.asked.set()
        await self.gate.wait()
        return await super().PromiseKeepBatch(request, context)


async def test_ids_repeated_while_their_batch_runs_get_the_batch_outcomes() -> None:
    """The drops of a batch share one future of their outcomes: each repeated id, sent alone
    while the batch waits for its keeper, gets its own directive's outcome, as a duplicate,
    and is not carried out again."""
    async with agents(2) as [(a, stub_a), (_, stub_b)]:
        keys = [f"shared-{i}" for i in range(50)]
        for key in keys:
            await put(stub_a, key, DATA)
            await put(stub_b, key, DATA)
        gated = _GatedKeeper(stub_b)  # type: ignore[abstract]
        async with fake_peer(gated) as keeper, directive_stream(stub_a) as amm:
            batch = [drop(key, [keeper], checksum=DIGEST) for key in keys]
            await amm.send_batch(batch)
            await asyncio.wait_for(gated.asked.wait(), 20)
            for directive in (batch[7], batch[31]):
                await amm.send(directive)
            gated.gate.set()
            outcomes: list[Any] = []
            while len(outcomes) < len(batch) + 2:
                response = await amm.next_response(within=20)
                assert response is not None, "the stream ended before every outcome"
                outcomes.extend(response.batch if not response.HasField("outcome") else [])
                if response.HasField("outcome"):
                    outcomes.append(response.outcome)
        repeated = [o for o in outcomes if o.duplicate]
        assert sorted(o.directive_id for o in repeated) == sorted([batch[7].id, batch[31].id])
        assert {status(o) for o in outcomes} == {"APPLIED"}
        assert gated.calls == {"PromiseKeepBatch": 1}, "the repeated ids were not run again"
        assert not any(key in a.store for key in keys)
