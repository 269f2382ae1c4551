"""Drops in columns (feature "drop-columns"): ``DirectivesRequest.drops`` carried out exactly as
the same directives in ``batch``, applied drops answered in ``DirectivesResponse.applied``,
malformed columns refused; and the AMM sending them only to agents that list the feature, and
taking outcomes in either form.

Real agents in process and real grpc.aio servers on loopback; the tests play the AMM on the
agents' streams, and fake agents (stubs) stand in for agents on the AMM's."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.view import Key, WorkerId
from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.links.dispatcher import Dispatcher
from tests.conftest import amm_config
from tests.support.agent import (
    DirectiveStream,
    Stub,
    agents,
    directive_stream,
    drop,
    inventory_answer,
    poll,
    put_everywhere,
    reason,
    status,
)
from tests.support.faults import amm_with_fake_peers, fake_peer
from tests.support.waiting import wait_for
from worker_agent.agent import Agent

DATA = b"columns" * 64
DIGEST = checksum(DATA)

#: What an outcome says, whichever form it came in: (status, reason, duplicate, whether it
#: names a dropped version).
Said = tuple[str, str, bool, bool]


def columns(directives: Sequence[types_pb2.Directive]) -> agent_pb2.DropColumns:
    """The DROP ``directives`` in columns, written out by hand (independent of the AMM's
    writer); they must share an epoch and a policy."""
    (epoch,) = {d.epoch for d in directives}
    (policy,) = {d.policy for d in directives}
    keepers: dict[tuple[str, ...], int] = {}
    reasons: dict[str, int] = {}
    for d in directives:
        keepers.setdefault(tuple(d.holders), len(keepers))
        reasons.setdefault(d.reason, len(reasons))
    return agent_pb2.DropColumns(
        epoch=epoch,
        ids=[d.id for d in directives],
        keys=[d.key for d in directives],
        sizes=[d.size for d in directives],
        checksums=[d.checksum for d in directives],
        keepers=[agent_pb2.Keepers(holders=h) for h in keepers],
        keepers_index=[keepers[tuple(d.holders)] for d in directives],
        policy=policy,
        reasons=list(reasons),
        reason_index=[reasons[d.reason] for d in directives],
    )


async def answers(amm: DirectiveStream, ids: Sequence[str]) -> dict[str, Said]:
    """What the agent said of each of ``ids``, read from batches and applied columns alike,
    until every one is answered; checks that applied columns only carry applied drops."""
    said: dict[str, Said] = {}
    while not set(ids) <= said.keys():
        response = await amm.next_response(within=20)
        assert response is not None, "the stream ended before every outcome"
        for o in response.batch:
            said[o.directive_id] = (status(o), reason(o), o.duplicate, o.dropped_version > 0)
        applied = response.applied
        assert len(applied.ids) == len(applied.inventory_versions) == len(applied.dropped_versions)
        for directive_id, dropped in zip(applied.ids, applied.dropped_versions, strict=True):
            assert dropped > 0
            said[directive_id] = ("APPLIED", "UNSPECIFIED", False, True)
    return said


def held(agent: Agent, keys: Sequence[str]) -> set[str]:
    return {k for k in keys if k in agent.store}


async def scenario(
    pair: list[tuple[Agent, Stub]], send: Callable[[DirectiveStream, list[Any]], None]
) -> tuple[dict[str, Said], set[str], set[str]]:
    """The same drops, sent by ``send`` (in ``batch`` or in columns), on a fresh pair: what
    the dropper answered, and the keys each agent holds afterwards. Drops applied, pinned, with
    no confirmed holder, malformed (no key), a repeated id, and a stale epoch."""
    (a, stub_a), (b, stub_b) = pair
    shared = [f"s{i}" for i in range(40)]
    await put_everywhere([stub_a, stub_b], [*shared, "pinned", "late"], DATA)
    await put_everywhere([stub_a], ["lonely"], DATA)
    await stub_a.Pin(agent_pb2.PinRequest(key="pinned"))
    keeper = [b.address]
    first = [
        *(drop(k, keeper, id=f"d-{k}", epoch=2, checksum=DIGEST, size=len(DATA)) for k in shared),
        drop("pinned", keeper, id="d-pinned", epoch=2, checksum=DIGEST),
        drop("lonely", keeper, id="d-lonely", epoch=2, checksum=DIGEST),
        drop("", keeper, id="d-keyless", epoch=2),
    ]
    again = [drop("s0", keeper, id="d-s0", epoch=2, checksum=DIGEST)]  # a repeated id
    stale = [drop("late", keeper, id="d-late", epoch=1, checksum=DIGEST)]
    said: dict[str, Said] = {}
    async with directive_stream(stub_a) as amm:
        send(amm, first)
        said |= await answers(amm, [d.id for d in first])
        send(amm, again)
        said["again"] = (await answers(amm, ["d-s0"]))["d-s0"]
        send(amm, stale)
        said |= await answers(amm, ["d-late"])
    everything = [*shared, "pinned", "late", "lonely"]
    return said, held(a, everything), held(b, everything)


def in_batch(amm: DirectiveStream, directives: list[Any]) -> None:
    amm.send_message(agent_pb2.DirectivesRequest(batch=directives))


def in_columns(amm: DirectiveStream, directives: list[Any]) -> None:
    amm.send_message(agent_pb2.DirectivesRequest(drops=columns(directives)))


async def test_an_agent_lists_drop_columns() -> None:
    async with agents(1) as [(_, stub)]:
        assert "drop-columns" in (await poll(stub)).features


async def test_drops_in_columns_are_carried_out_as_the_same_directives_in_a_batch() -> None:
    async with agents(2) as pair:
        batched = await scenario(pair, in_batch)
    async with agents(2) as pair:
        columnar = await scenario(pair, in_columns)
    assert columnar == batched
    said, dropper, keeper = columnar
    assert said["d-s0"] == ("APPLIED", "UNSPECIFIED", False, True)
    assert said["again"][:3] == ("APPLIED", "UNSPECIFIED", True)  # its stored outcome
    assert said["d-pinned"][:2] == ("REFUSED", "PINNED")
    assert said["d-lonely"][:2] == ("REFUSED", "NO_CONFIRMED_HOLDER")
    assert said["d-keyless"][:2] == ("REFUSED", "INVALID")
    assert said["d-late"][:2] == ("REFUSED", "STALE_EPOCH")
    assert dropper == {"pinned", "late", "lonely"}
    assert "lonely" not in keeper
    assert {"pinned", "late", "s0"} <= keeper


async def test_columns_and_a_batch_in_one_message_are_all_carried_out() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"k{i}" for i in range(10)]
        await put_everywhere([stub_a, stub_b], keys, DATA)
        ds = [drop(k, [b.address], id=f"d-{k}", checksum=DIGEST) for k in keys]
        async with directive_stream(stub_a) as amm:
            amm.send_message(agent_pb2.DirectivesRequest(batch=ds[:4], drops=columns(ds[4:])))
            said = await answers(amm, [d.id for d in ds])
        assert {s[0] for s in said.values()} == {"APPLIED"}
        assert not held(a, keys)


async def test_applied_drops_come_in_columns_only_on_a_stream_that_brought_columns() -> None:
    async with agents(2) as [(_, stub_a), (b, stub_b)]:
        keys = [f"k{i}" for i in range(6)]
        await put_everywhere([stub_a, stub_b], keys, DATA)
        ds = [drop(k, [b.address], id=f"d-{k}", checksum=DIGEST) for k in keys]
        async with directive_stream(stub_a) as amm:
            in_batch(amm, ds[:3])
            response = await amm.next_response(within=20)
            assert response is not None
            assert not response.HasField("applied")
            assert [status(o) for o in response.batch] == ["APPLIED"] * 3
            in_columns(amm, ds[3:])
            response = await amm.next_response(within=20)
            assert response is not None
            assert list(response.applied.ids) == [d.id for d in ds[3:]]
            assert not response.batch


def malformed() -> dict[str, agent_pb2.DropColumns]:
    """Columns that do not line up, each with an empty id among its ids."""

    def of(**change: Any) -> agent_pb2.DropColumns:
        good = columns(
            [drop(k, ["127.0.0.1:1"], id=f"bad-{k}", checksum=DIGEST) for k in ("k0", "k1")]
        )
        good.ids.append("")
        good.keys.append("k2")
        good.sizes.append(0)
        good.checksums.append(DIGEST)
        good.keepers_index.append(0)
        good.reason_index.append(0)
        for name, value in change.items():
            good.ClearField(name)  # type: ignore[arg-type]
            getattr(good, name).extend(value)
        return good

    return {
        "a key short": of(keys=["k0", "k1"]),
        "a size too many": of(sizes=[0, 0, 0, 0]),
        "no checksums": of(checksums=[]),
        "a keepers index short": of(keepers_index=[0]),
        "a keepers index beyond its table": of(keepers_index=[0, 1, 0]),
        "a reason index beyond its table": of(reason_index=[0, 0, 7]),
    }


async def test_malformed_columns_are_refused_invalid_and_drop_nothing() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = ["k0", "k1", "k2", "fine"]
        await put_everywhere([stub_a, stub_b], keys, DATA)
        async with directive_stream(stub_a) as amm:
            for what, bad in malformed().items():
                bad.keepers[0].holders[:] = [b.address]
                amm.send_message(agent_pb2.DirectivesRequest(drops=bad))
                said = await answers(amm, ["bad-k0", "bad-k1", ""])
                assert {s[:2] for s in said.values()} == {("REFUSED", "INVALID")}, what
                assert held(a, keys) == set(keys), what
            # The stream goes on: a good message after them is carried out.
            in_columns(amm, [drop("fine", [b.address], id="fine", checksum=DIGEST)])
            assert (await answers(amm, ["fine"]))["fine"][0] == "APPLIED"
        assert held(a, keys) == {"k0", "k1", "k2"}


async def test_malformed_columns_tell_why() -> None:
    async with agents(1) as [(_, stub)], directive_stream(stub) as amm:
        bad = malformed()["a keepers index beyond its table"]
        amm.send_message(agent_pb2.DirectivesRequest(drops=bad))
        response = await amm.next_response(within=20)
        assert response is not None
        messages = {o.message for o in response.batch}
        assert len(messages) == 1
        assert "keepers_index" in messages.pop()


async def test_undecodable_columns_are_refused_by_id() -> None:
    """Columns whose bytes do not decode (a key that is not UTF-8): each id is refused INVALID,
    nothing is dropped, and the stream goes on."""
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put_everywhere([stub_a, stub_b], ["KEYAA", "ok"], DATA)
        good = columns([drop("KEYAA", [b.address], id="garbled", checksum=DIGEST)])
        raw = agent_pb2.DirectivesRequest(drops=good).SerializeToString()
        later = agent_pb2.DirectivesRequest(
            drops=columns([drop("ok", [b.address], id="later", checksum=DIGEST)])
        )
        sent: asyncio.Queue[bytes | None] = asyncio.Queue()
        for message in (raw.replace(b"KEYAA", b"KEY\xff\xfe"), later.SerializeToString()):
            sent.put_nowait(message)

        async def requests() -> AsyncIterator[bytes]:
            while (message := await sent.get()) is not None:
                yield message

        async with grpc.aio.insecure_channel(a.address, options=CHANNEL_OPTIONS) as channel:
            call = channel.stream_stream(
                "/amm.v1.WorkerAgent/Directives",
                request_serializer=None,
                response_deserializer=agent_pb2.DirectivesResponse.FromString,
            )(requests())
            said: dict[str, tuple[str, str]] = {}
            async for response in call:
                for o in response.batch:
                    said[o.directive_id] = (status(o), reason(o))
                said |= dict.fromkeys(response.applied.ids, ("APPLIED", "UNSPECIFIED"))
                if len(said) == 2:
                    sent.put_nowait(None)
        assert said == {"garbled": ("REFUSED", "INVALID"), "later": ("APPLIED", "UNSPECIFIED")}
        assert held(a, ["KEYAA", "ok"]) == {"KEYAA"}


# -- the AMM's side ----------------------------------------------------------------------------


def _version(directive_id: str) -> int:
    """The inventory version a fake agent says a directive took effect at: past the version
    its polls report (1), and the same whichever form the outcome comes in."""
    return 2 + zlib.crc32(directive_id.encode()) % 1000


class _Agent(agent_pb2_grpc.WorkerAgentServicer):
    """A fake agent holding ``keys`` (at inventory version 1): it notes every Directives
    message and applies every directive at once, answering applied drops in columns when it
    lists "drop-columns" and was sent columns, in ``batch`` otherwise, as a real agent does."""

    def __init__(self, name: str, keys: Sequence[str], columns: bool) -> None:
        self.name = name
        self.features = ["directive-batches", *(["drop-columns"] if columns else [])]
        self.inventory = [types_pb2.KeyInfo(key=k, size=1, checksum=DIGEST) for k in keys]
        self.requests: list[agent_pb2.DirectivesRequest] = []

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return inventory_answer(request, self.name, self.inventory, self.features)

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            self.requests.append(request)
            response = agent_pb2.DirectivesResponse(incarnation=self.name)
            for d in request.batch:
                dropped = _version(d.id) if d.op == types_pb2.DIRECTIVE_OP_DROP else 0
                response.batch.add(
                    directive_id=d.id,
                    status=types_pb2.OUTCOME_STATUS_APPLIED,
                    inventory_version=_version(d.id),
                    dropped_version=dropped,
                )
            for directive_id in request.drops.ids:
                response.applied.ids.append(directive_id)
                response.applied.inventory_versions.append(_version(directive_id))
                response.applied.dropped_versions.append(_version(directive_id))
            yield response

    def drops_in(self) -> tuple[list[str], list[str]]:
        """The ids of the drops received: in ``batch``, and in columns."""
        batched = [
            d.id for r in self.requests for d in r.batch if d.op == types_pb2.DIRECTIVE_OP_DROP
        ]
        return batched, [i for r in self.requests for i in r.drops.ids]


async def test_the_amm_sends_columns_only_to_agents_that_list_the_feature(
    tmp_path: Path,
) -> None:
    """Four agents hold every key; two list "drop-columns". The cycle's drops reach the two in
    columns, the others in ``batch``; both forms of applied outcomes settle every drop, and the
    view takes each agent off the keys it dropped at once."""
    keys = [f"key-{i:03d}" for i in range(60)]
    peers = {
        name: _Agent(name, keys, columns=name in ("c1", "c2"))  # type: ignore[abstract]
        for name in ("c1", "c2", "o1", "o2")
    }
    async with amm_with_fake_peers(amm_config(tmp_path), peers) as (_, manager, addresses):
        await manager.queries.refresh(True)
        record = await manager.run_cycle()
        planned = record.planned_count
        assert planned > 0
        await wait_for(lambda: len(manager.ledger) == 0, what="every drop settles")
        assert manager.outcomes.totals.applied == planned
        assert manager.outcomes.totals.failed == 0
        held = {
            name: manager.state.held_by(WorkerId(address))
            for name, address in zip(peers, addresses, strict=True)
        }
    for name, agent in peers.items():
        batched, columnar = agent.drops_in()
        assert batched or columnar, f"{name} was sent no drop"
        if name.startswith("c"):
            assert columnar, name
            assert not batched, name
            assert all(r.drops.epoch == manager.epoch for r in agent.requests if r.drops.ids)
        else:
            assert batched, name
            assert not columnar, name
            assert not any(r.HasField("drops") for r in agent.requests), name
        # Taken off at once, from its outcomes (the fake's polls report no change).
        assert len(held[name]) == len(keys) - len(batched) - len(columnar), name


async def test_the_dispatcher_takes_outcomes_in_both_forms_alike() -> None:
    """The same drops and replicates sent to an agent that takes columns and to one that does
    not: the columns spell each drop exactly as its ``batch`` Directive, replicates stay in
    ``batch``, and the outcomes handed on are the same in both forms."""
    columnar = _Agent("columnar", [], columns=True)  # type: ignore[abstract]
    plain = _Agent("plain", [], columns=False)  # type: ignore[abstract]
    links = AgentLinks()
    got: dict[WorkerId, list[Outcome]] = {}

    def on_outcomes(worker: WorkerId, outcomes: Sequence[Outcome]) -> None:
        got.setdefault(worker, []).extend(outcomes)

    async with fake_peer(columnar) as c_address, fake_peer(plain) as p_address:
        c_worker, p_worker = WorkerId(c_address), WorkerId(p_address)
        dispatcher = Dispatcher(
            links, on_outcomes, lambda worker: True, lambda worker: worker == c_worker
        )

        def directives(worker: WorkerId) -> list[Directive]:
            made = [
                Directive(
                    f"drop-{i}",
                    7,
                    Op.DROP,
                    Key(f"k{i}"),
                    worker,
                    i,
                    DIGEST,
                    holders=(WorkerId(f"10.0.0.{i % 3}:1"),) * (1 + i % 2),
                    policy="ReduceReplicas",
                    reason=f"reason {i % 2}",
                )
                for i in range(30)
            ]
            made.insert(
                5,
                Directive("copy", 7, Op.REPLICATE, Key("c"), worker, 1, DIGEST, (WorkerId("s:1"),)),
            )
            return made

        try:
            await dispatcher.send(directives(c_worker))
            await dispatcher.send(directives(p_worker))
            await wait_for(
                lambda: sum(map(len, got.values())) == 62, what="every directive answered"
            )
        finally:
            await dispatcher.close()
            await links.close_all()

    (c_request,) = columnar.requests
    (p_request,) = plain.requests
    assert [d.id for d in c_request.batch] == ["copy"]
    assert not p_request.HasField("drops")
    spelled = [
        types_pb2.Directive(
            id=c_request.drops.ids[i],
            epoch=c_request.drops.epoch,
            op=types_pb2.DIRECTIVE_OP_DROP,
            key=c_request.drops.keys[i],
            size=c_request.drops.sizes[i],
            checksum=c_request.drops.checksums[i],
            holders=c_request.drops.keepers[c_request.drops.keepers_index[i]].holders,
            policy=c_request.drops.policy,
            reason=c_request.drops.reasons[c_request.drops.reason_index[i]],
        )
        for i in range(len(c_request.drops.ids))
    ]
    assert spelled == [d for d in p_request.batch if d.id != "copy"]

    def alike(outcomes: list[Outcome]) -> list[tuple[Any, ...]]:
        return sorted(o._replace(incarnation="") for o in outcomes)

    assert alike(got[c_worker]) == alike(got[p_worker])
    assert {o.status for o in got[c_worker]} == {OutcomeStatus.APPLIED}
    assert {o.incarnation for o in got[c_worker]} == {"columnar"}
