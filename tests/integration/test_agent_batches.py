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
    put_everywhere,
    reason,
    replicate,
    run_batch,
    status,
)
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for
from worker_agent import directives as directives_module
from worker_agent import pacing
from worker_agent import store as store_module
from worker_agent.store import Key

DATA = b"batched" * 100
DIGEST = checksum(DATA)


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
        await put_everywhere([stub_a, stub_b], keys, DATA)
        counting = _CountingKeeper(stub_b)  # type: ignore[abstract]
        async with fake_peer(counting) as keeper:
            outcomes = await run_batch(
                stub_a, [drop(key, [keeper], checksum=DIGEST) for key in keys]
            )
        assert {status(o) for o in outcomes} == {"APPLIED"}
        assert counting.calls == {"PromiseKeepBatch": 1}
        assert counting.items == len(keys)
        assert not any(key in a.store for key in keys)
        assert all(key in b.store for key in keys)
        # The keeper keeps its promise: its copies cannot be dropped during the lease.
        refused = await run_batch(stub_b, [drop(keys[0], [a.address], checksum=DIGEST)])
        assert reason(refused[0]) in {"KEEP_PROMISED", "NO_CONFIRMED_HOLDER"}
        assert keys[0] in b.store


class _GatedCountingKeeper(_CountingKeeper):
    """A ``_CountingKeeper`` whose first PromiseKeepBatch is answered once ``opened`` is set."""

    def __init__(self, target: Stub) -> None:
        super().__init__(target)
        self.opened = asyncio.Event()

    async def PromiseKeepBatch(
        self, request: Any, context: Any
    ) -> agent_pb2.PromiseKeepBatchResponse:
        if not self.calls:
            self.calls["PromiseKeepBatch"] += 1
            self.items += len(request.items)
            await self.opened.wait()
            return await self.target.PromiseKeepBatch(request)
        return await super().PromiseKeepBatch(request, context)


async def test_batches_of_drops_waiting_their_turn_ask_their_keeper_once_together() -> None:
    """The AMM sends a cycle's drops as messages of a few hundred. While one batch waits for
    its promises, the next messages wait their turn: they are then carried out as one batch
    (one PromiseKeepBatch for all of them, not one each), each drop with its own outcome; a
    message repeating a key already taken waits for the next turn, as it would alone."""
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"turn-{i:03d}" for i in range(200)]
        await _put_many(stub_a, keys)
        await _put_many(stub_b, keys)
        gated = _GatedCountingKeeper(stub_b)  # type: ignore[abstract]
        async with fake_peer(gated) as keeper, directive_stream(stub_a) as amm:
            messages = [
                [drop(key, [keeper], checksum=DIGEST) for key in keys[start : start + 50]]
                for start in range(0, 200, 50)
            ]
            again = drop(keys[60], [keeper], checksum=DIGEST)  # a key of the second message
            for message in [*messages, [again]]:
                await amm.send_batch(message)
            runner = a.node.runner
            await wait_for(lambda: len(runner._running) == 201, what="every message in hand")
            assert gated.calls == {"PromiseKeepBatch": 1}  # the first batch, waiting
            gated.opened.set()
            outcomes: list[types_pb2.DirectiveOutcome] = []
            while len(outcomes) < 201:
                response = await amm.next_response(within=20)
                assert response is not None
                outcomes.extend(response.batch)
        by_id = {o.directive_id: o for o in outcomes}
        assert len(by_id) == 201
        assert all(status(by_id[d.id]) == "APPLIED" for m in messages for d in m)
        # Found gone once the first drop of the key went through: a no-op, applied.
        assert status(by_id[again.id]) == "APPLIED", by_id[again.id].message
        # The first batch, then the three that waited, together; the repeated key's drop was
        # left for a turn of its own, and its key was gone by then (nothing to ask).
        assert gated.calls == {"PromiseKeepBatch": 2}, gated.calls
        assert gated.items == 200
        assert not any(key in a.store for key in keys)
        assert all(key in b.store for key in keys)


class _TurnstileKeeper(_CountingKeeper):
    """A ``_CountingKeeper`` that answers its n-th PromiseKeepBatch (from 0) once ``allowed``
    exceeds n; notes the items of each call."""

    def __init__(self, target: Stub) -> None:
        super().__init__(target)
        self.allowed = 0
        self.sizes: list[int] = []
        self._changed = asyncio.Condition()

    async def allow(self, count: int) -> None:
        async with self._changed:
            self.allowed = count
            self._changed.notify_all()

    async def PromiseKeepBatch(
        self, request: Any, context: Any
    ) -> agent_pb2.PromiseKeepBatchResponse:
        turn = len(self.sizes)
        self.sizes.append(len(request.items))
        async with self._changed:
            await self._changed.wait_for(lambda: self.allowed > turn)
        return await super().PromiseKeepBatch(request, context)


async def test_a_joined_batch_whose_stream_ends_hands_the_others_back() -> None:
    """The batch carrying out others' drops with its own is cancelled (its stream ended) while
    it waits for promises: the batches it took go back in line and their own streams carry
    them out, every drop with its outcome; the cancelled stream's keys stay, unmarked."""
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"hand-{i:03d}" for i in range(150)]
        await _put_many(stub_a, keys)
        await _put_many(stub_b, keys)
        turnstile = _TurnstileKeeper(stub_b)  # type: ignore[abstract]
        first, second, third = keys[:50], keys[50:100], keys[100:]

        def message(part: list[str]) -> list[types_pb2.Directive]:
            return [drop(key, [keeper], checksum=DIGEST) for key in part]

        async with (
            fake_peer(turnstile) as keeper,
            directive_stream(stub_a) as x,
            directive_stream(stub_a) as y,
            directive_stream(stub_a) as z,
        ):
            await x.send_batch(message(first))
            await wait_for(lambda: len(turnstile.sizes) == 1, what="the first batch asking")
            await y.send_batch(message(second))
            await z.send_batch(message(third))
            runner = a.node.runner
            await wait_for(lambda: len(runner._running) == 150, what="every message in hand")
            await turnstile.allow(1)
            await wait_for(lambda: len(turnstile.sizes) == 2, what="the joined batch asking")
            assert turnstile.sizes == [50, 100]
            await y.close()
            await turnstile.allow(3)
            for stream, part in ((x, first), (z, third)):
                outcomes: list[types_pb2.DirectiveOutcome] = []
                while len(outcomes) < len(part):
                    response = await stream.next_response(within=20)
                    assert response is not None
                    outcomes.extend(response.batch)
                assert {status(o) for o in outcomes} == {"APPLIED"}
        assert turnstile.sizes == [50, 100, 50]
        assert not any(key in a.store for key in first + third)
        assert all(key in a.store and not a.store.is_dropping(Key(key)) for key in second)
        assert all(key in b.store for key in keys)


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
        outcomes = await run_batch(stub_a, directives)
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
        await put_everywhere([stub_a, stub_b], keys, DATA)
        first, second = await asyncio.gather(
            run_batch(stub_a, [drop(key, [b.address], checksum=DIGEST) for key in keys]),
            run_batch(stub_b, [drop(key, [a.address], checksum=DIGEST) for key in keys]),
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
        outcomes = {o.directive_id: o for o in await run_batch(stub_a, batch)}
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
        again = await run_batch(stub_a, [repeated])
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
        await put_everywhere([stub_a, stub_b], keys, DATA)
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


async def test_holds_keys_is_answered_while_a_batch_of_drops_rebuilds_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of thousands of drops leaves the store's sorted index listing thousands of
    removed keys; it is rebuilt a slice at a time, paced with the drops, so that a HoldsKeys
    arriving meanwhile is answered between two slices (rebuilt in one step inside a removal, it
    held an agent's loop 10-16 ms with 100k keys). Every slice of bulk work breathes here
    (a budget of 0), so no timing is relied on; the index lists exactly the keys held after."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)
    monkeypatch.setattr(store_module, "COMPACT_SLICE", 256, raising=False)
    async with agents(2) as [(a, stub_a), (b, _)]:
        keys = [f"index-{i:05d}" for i in range(store_module.STALE_SORTED_MIN * 3)]
        for agent in (a, b):
            agent.store.add_many((Key(key), DATA, DIGEST) for key in keys)
        dropped, kept = keys[: directives_module.JOIN_DROPS], keys[directives_module.JOIN_DROPS :]
        batch = asyncio.create_task(
            run_batch(stub_a, [drop(key, [b.address], checksum=DIGEST) for key in dropped])
        )
        request = agent_pb2.HoldsKeysRequest(keys=[kept[0], dropped[0]])
        answered, while_rebuilding = 0, 0
        while not batch.done():
            before = getattr(a.store, "compacting", False)
            response = await stub_a.HoldsKeys(request)
            assert kept[0] in {k.key for k in response.keys}
            answered += 1
            while_rebuilding += before and getattr(a.store, "compacting", False)
        outcomes = await batch
        assert {status(o) for o in outcomes} == {"APPLIED"}
        assert while_rebuilding >= 1, f"none of {answered} answered while the index was rebuilt"
        assert [info.key for info in a.store.snapshot()] == kept
        assert len(a.store._sorted) < len(keys), "rebuilt without the removed keys"
