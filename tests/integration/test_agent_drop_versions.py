"""What an agent says of an applied DROP so that the AMM can take it into its view before it
polls: ``DirectiveOutcome.dropped_version`` (a version at which the key was gone, read with the
drop) and ``DirectivesResponse.incarnation`` (whose versions they are). The test plays the AMM;
agents run in process."""

from __future__ import annotations

from amm.base.checksum import checksum
from amm.v1 import agent_pb2
from tests.support.agent import (
    agents,
    directive_stream,
    drop,
    new_id,
    poll,
    put,
    put_everywhere,
    replicate,
    run_batch,
    status,
)

DATA = b"the value" * 1000


async def test_a_single_drop_says_when_its_key_was_gone_and_a_repeat_says_the_same() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        await put_everywhere([stub_a, stub_b], ("k", "pinned"), DATA)
        await stub_a.Pin(agent_pb2.PinRequest(key="pinned"))
        async with directive_stream(stub_a) as amm:
            directive = drop("k", [b.address], checksum=checksum(DATA))
            await amm.send(directive)
            response = await amm.next_response()
            assert response is not None
            outcome = response.outcome
            assert status(outcome) == "APPLIED", outcome.message
            assert response.incarnation == a.incarnation
            gone_at = a.store.version
            assert outcome.dropped_version == gone_at
            # The key was gone at that version: a poll since the one before reports it removed.
            changes = await poll(stub_a, since_version=gone_at - 1, incarnation=a.incarnation)
            assert list(changes.removed) == ["k"]

            await put(stub_a, "later", DATA)  # the inventory moves on
            repeated = await amm.run(directive)
            assert repeated.duplicate
            assert repeated.dropped_version == gone_at

            not_held = await amm.run(drop("nothing", [b.address]))
            assert (status(not_held), not_held.dropped_version) == ("APPLIED", a.store.version)

            refused = await amm.run(drop("pinned", [b.address], checksum=checksum(DATA)))
            assert (status(refused), refused.dropped_version) == ("REFUSED", 0)

        async with directive_stream(stub_b) as amm:
            copied = await amm.run(replicate("later", DATA, [a.address]))
            assert (status(copied), copied.dropped_version) == ("APPLIED", 0)


async def test_each_drop_of_a_batch_says_the_version_its_key_was_gone_at() -> None:
    async with agents(2) as [(a, stub_a), (b, stub_b)]:
        keys = [f"k{i}" for i in range(30)]
        await put_everywhere([stub_a, stub_b], keys, DATA)
        before = a.store.version
        batch = [drop(key, [b.address], checksum=checksum(DATA), id=new_id()) for key in keys]
        outcomes = await run_batch(stub_a, batch, incarnation=a.incarnation)
        assert {status(o) for o in outcomes} == {"APPLIED"}
        versions = sorted(o.dropped_version for o in outcomes)
        # One removal each, in turn: every key gone at the version its own removal made.
        assert versions == list(range(before + 1, before + len(keys) + 1))
        key_of = {d.id: d.key for d in batch}
        for o in outcomes:
            changes = await poll(
                stub_a, since_version=o.dropped_version - 1, incarnation=a.incarnation
            )
            assert key_of[o.directive_id] in changes.removed
