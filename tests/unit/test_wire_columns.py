"""Drops in columns (feature "drop-columns"), both ends: the AMM's columns spell each drop as its
``batch`` Directive would, the agent reads them back as the directives it would have decoded
from ``batch``, and applied outcomes in columns read as the same outcomes in ``batch``."""

from __future__ import annotations

import asyncio

from amm.v1 import agent_pb2, types_pb2
from amm_service import wire
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.view import Key, WorkerId
from worker_agent import garbled, servicer
from worker_agent.directives import Outcome as AgentOutcome
from worker_agent.directives import OutcomeStatus as AgentStatus
from worker_agent.integrity import Reason

A, B, C = WorkerId("a:1"), WorkerId("b:1"), WorkerId("c:1")


def drops(n: int, epoch: int = 3, policy: str = "P") -> list[Directive]:
    """``n`` drops with a few distinct keepers and reasons, some equal but not the same
    objects."""
    return [
        Directive(
            f"e1.x.{i}",
            epoch,
            Op.DROP,
            Key(f"k{i}"),
            A,
            i,
            f"{i:064x}",
            (),
            (B, C) if i % 3 else (C,),
            policy,
            f"{2 + i % 2} live copies, 1 needed",
        )
        for i in range(n)
    ]


def spelled(columns: agent_pb2.DropColumns) -> list[types_pb2.Directive]:
    """The Directive each drop of ``columns`` stands for (the contract's reading)."""
    return [
        types_pb2.Directive(
            id=columns.ids[i],
            epoch=columns.epoch,
            op=types_pb2.DIRECTIVE_OP_DROP,
            key=columns.keys[i],
            size=columns.sizes[i],
            checksum=columns.checksums[i],
            holders=columns.keepers[columns.keepers_index[i]].holders,
            policy=columns.policy,
            reason=columns.reasons[columns.reason_index[i]],
        )
        for i in range(len(columns.ids))
    ]


def test_columns_written_in_slices_spell_each_drop_as_its_own_message_would() -> None:
    directives = drops(20)
    request = agent_pb2.DirectivesRequest()
    writer = wire.DropColumnsWriter(request.drops)
    for start in range(0, 20, 7):
        writer.add(directives[start : start + 7])
    assert writer.count == 20
    assert spelled(request.drops) == [wire.directive_to_pb(d) for d in directives]
    assert len(request.drops.keepers) == 2  # a table of the distinct ones, across slices
    assert len(request.drops.reasons) == 2
    assert not request.batch


def test_only_drops_of_the_first_drops_epoch_and_policy_go_in_columns() -> None:
    same = drops(4)
    assert wire.split_drops(same) == (same, ())
    copy = Directive("copy", 3, Op.REPLICATE, Key("c"), A, 1, "0" * 64, (B,))
    newer = drops(1, epoch=4)[0]._replace(id="newer")
    other = drops(1, policy="Q")[0]._replace(id="other")
    mixed = [copy, same[0], newer, same[1], other, same[2]]
    assert wire.split_drops(mixed) == ([same[0], same[1], same[2]], [copy, newer, other])
    assert wire.split_drops([copy]) == ((), [copy])
    assert wire.split_drops([]) == ([], ())


def test_applied_drops_in_columns_read_as_the_same_outcomes_in_a_batch() -> None:
    outcomes = [
        types_pb2.DirectiveOutcome(
            directive_id=f"d{i}",
            status=types_pb2.OUTCOME_STATUS_APPLIED,
            inventory_version=100 + i,
            dropped_version=90 + i,
        )
        for i in range(5)
    ]
    applied = agent_pb2.AppliedDrops(
        ids=[o.directive_id for o in outcomes],
        inventory_versions=[o.inventory_version for o in outcomes],
        dropped_versions=[o.dropped_version for o in outcomes],
    )
    assert wire.outcomes_from_applied(applied, "inc") == wire.outcomes_from_pb(outcomes, "inc")


def test_applied_columns_that_do_not_line_up_fail_every_id() -> None:
    applied = agent_pb2.AppliedDrops(
        ids=["a", "b"], inventory_versions=[1, 2], dropped_versions=[1]
    )
    read = wire.outcomes_from_applied(applied, "inc")
    assert [(o.directive_id, o.status) for o in read] == [
        ("a", OutcomeStatus.FAILED),
        ("b", OutcomeStatus.FAILED),
    ]
    assert all(o.dropped_version == 0 for o in read)


def test_the_agent_reads_columns_as_the_directives_it_reads_from_a_batch() -> None:
    request = agent_pb2.DirectivesRequest()
    wire.DropColumnsWriter(request.drops).add(drops(9000))  # more than a step of the loop
    assert servicer.columns_problem(request.drops) == ""
    read = asyncio.run(servicer.drops_from_columns(request.drops))
    assert read == [servicer.directive_from_proto(d) for d in spelled(request.drops)]
    # One tuple per distinct list of keepers, shared by the drops naming it.
    assert len({id(d.holders) for d in read}) == 2


def test_columns_that_do_not_line_up_are_told_apart() -> None:
    request = agent_pb2.DirectivesRequest()
    wire.DropColumnsWriter(request.drops).add(drops(3))
    short = agent_pb2.DropColumns()
    short.CopyFrom(request.drops)
    del short.sizes[-1]
    assert "2 sizes for 3 ids" in servicer.columns_problem(short)
    beyond = agent_pb2.DropColumns()
    beyond.CopyFrom(request.drops)
    beyond.reason_index[0] = 2
    assert "reason_index 2 beyond the 2 entries" in servicer.columns_problem(beyond)
    assert servicer.columns_problem(agent_pb2.DropColumns()) == ""


def test_the_agent_answers_applied_drops_in_columns_and_the_rest_in_its_batch() -> None:
    applied = AgentOutcome("d1", AgentStatus.APPLIED, None, "dropped; b keeps it", 10, False, 9)
    copied = AgentOutcome("d2", AgentStatus.APPLIED, None, "replicated", 11)
    repeated = applied._replace(directive_id="d3", duplicate=True)
    refused = AgentOutcome("d4", AgentStatus.REFUSED, Reason.PINNED, "pinned", 12)
    group = [applied, copied, repeated, refused, applied._replace(directive_id="d5")]
    response = servicer.outcomes_response(group, "inc", columns=True)
    assert list(response.applied.ids) == ["d1", "d5"]
    assert list(response.applied.inventory_versions) == [10, 10]
    assert list(response.applied.dropped_versions) == [9, 9]
    assert [o.directive_id for o in response.batch] == ["d2", "d3", "d4"]
    assert response.batch[1].duplicate
    # Read by the AMM, the two forms say the same of every outcome but the message.
    both = wire.outcomes_from_applied(response.applied, "inc") + wire.outcomes_from_pb(
        response.batch, "inc"
    )
    plain = servicer.outcomes_response(group, "inc")
    assert not plain.HasField("applied")
    alone = wire.outcomes_from_pb(plain.batch, "inc")

    def said(outcomes: list[Outcome]) -> list[Outcome]:
        return sorted(o._replace(message="") for o in outcomes)

    assert said(both) == said(alone)
    # Every drop applied: all in columns, nothing in the batch.
    only = servicer.outcomes_response([applied, group[-1]], "inc", columns=True)
    assert (list(only.applied.ids), len(only.batch)) == (["d1", "d5"], 0)


def field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_columns_of_a_message_that_does_not_decode_are_salvaged() -> None:
    good = agent_pb2.DropColumns(ids=["x"], keys=["k"])
    bad_batch = field(2, field(1, b"bad") + field(4, b"\xff"))
    salvaged = garbled.decode_directives(bad_batch + field(3, good.SerializeToString()))
    assert isinstance(salvaged, garbled.Garbled)
    assert (salvaged.batch, salvaged.fatal, salvaged.drops) == (True, "", good)
    assert salvaged.request().drops == good
    # Columns that do not decode themselves: each readable id is refused.
    bad_columns = field(2, b"one") + field(2, b"two") + field(3, b"\xff")
    salvaged = garbled.decode_directives(field(3, bad_columns))
    assert isinstance(salvaged, garbled.Garbled)
    assert salvaged.fatal == ""
    assert [i for i, _ in salvaged.refused] == ["one", "two"]
    assert salvaged.drops is None
    # An id that is not UTF-8 names nothing: the stream ends.
    unnamed = garbled.decode_directives(field(3, field(2, b"\xff") + field(3, b"\xff")))
    assert isinstance(unnamed, garbled.Garbled)
    assert unnamed.fatal
