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


def test_an_outcome_reads_back_as_sent() -> None:
    for outcome in (
        Outcome("e1.x.1", OutcomeStatus.APPLIED, inventory_version=7),
        Outcome("e1.x.2", OutcomeStatus.REFUSED, "PINNED", "pinned by a reader", 3, True),
        Outcome("e1.x.3", OutcomeStatus.FAILED, "", "stream broke", 0),
    ):
        assert wire.outcome_from_pb(wire.outcome_to_pb(outcome)) == outcome
