"""A batch of directives on the wire carries each directive exactly as one message of it does,
and an outcome read back is the outcome sent."""

from __future__ import annotations

from amm_service import wire
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.view import Key, WorkerId


def test_a_batch_holds_each_directive_as_its_own_message_would() -> None:
    a, b, c = WorkerId("a"), WorkerId("b"), WorkerId("c")
    directives = [
        Directive("e1.x.1", 3, Op.DROP, Key("k"), a, 10, "sum", (), (b, c), "P", "why"),
        Directive("e1.x.2", 3, Op.REPLICATE, Key("k"), c, 10, "sum", (a,), (), "Q", ""),
        Directive("e1.x.3", 3, Op.DROP, Key("j"), b, 0, "", (), (), "", ""),
    ]
    request = wire.directives_request(directives)
    assert list(request.batch) == [wire.directive_to_pb(d) for d in directives]


def test_directives_that_share_fields_each_carry_their_own() -> None:
    """The batch builder reuses the fields directives share (keepers, reason, policy, epoch,
    op, sources): each directive must still carry exactly its own, whether the shared ones are
    the same objects, equal ones, or differ in one field only."""
    a, b, c = WorkerId("a"), WorkerId("b"), WorkerId("c")
    keepers, reason = (b, c), "4 live copies, 1 needed"
    directives = [
        Directive("e1.x.1", 3, Op.DROP, Key("k1"), a, 10, "s1", (), keepers, "P", reason),
        Directive(
            "e1.x.2", 3, Op.DROP, Key("k1"), WorkerId("d"), 10, "s1", (), keepers, "P", reason
        ),
        Directive(
            "e1.x.3", 3, Op.DROP, Key("k2"), a, 11, "s2", (), (b, c), "P", "4 live copies, 1 needed"
        ),
        Directive("e1.x.4", 3, Op.DROP, Key("k3"), a, 12, "s3", (), (c, b), "P", reason),
        Directive("e1.x.5", 3, Op.DROP, Key("k4"), a, 13, "s4", (), keepers, "P", "other"),
        Directive("e1.x.6", 4, Op.DROP, Key("k5"), a, 14, "s5", (), keepers, "P", reason),
        Directive("e1.x.7", 3, Op.REPLICATE, Key("k6"), a, 15, "s6", keepers, (), "P", reason),
        Directive("e1.x.8", 3, Op.REPLICATE, Key("k7"), a, 0, "", (c,), (), "", ""),
        Directive("e1.x.9", 0, Op.DROP, Key("ключ"), a, 0, "", (), (), "", ""),
        Directive("e1.x.10", 3, Op.DROP, Key("k1"), a, 10, "s1", (), keepers, "P", reason),
    ]
    request = wire.directives_request(directives)
    assert list(request.batch) == [wire.directive_to_pb(d) for d in directives]
    again = wire.directives_request(directives[:3])
    wire.directives_request(directives[3:], again)  # added to the same request
    assert list(again.batch) == list(request.batch)


def test_an_outcome_reads_back_as_sent() -> None:
    for outcome in (
        Outcome("e1.x.1", OutcomeStatus.APPLIED, inventory_version=7),
        Outcome("e1.x.2", OutcomeStatus.REFUSED, "PINNED", "pinned by a reader", 3, True),
        Outcome("e1.x.3", OutcomeStatus.FAILED, "", "stream broke", 0),
    ):
        assert wire.outcome_from_pb(wire.outcome_to_pb(outcome)) == outcome
