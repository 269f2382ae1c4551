"""The handover: which copy outcomes release a retiring worker's keys between cycles, and which
never do. Real cluster states, a real ledger and the real ``Outcomes`` feeding it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.events import EventLog
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId, WorkerStatus
from amm_service.runtime.records.outcomes import Outcomes
from amm_service.runtime.workers.handover import Handover
from tests.factories import cluster, new_ids

EPOCH = 7
R, A, B = WorkerId("r"), WorkerId("a"), WorkerId("b")


class Rig:
    """A handover wired as the manager wires it, recording what it sends and finishes."""

    def __init__(self, state: ClusterState, retiring: Sequence[WorkerId] = (R,)) -> None:
        self.state = state
        self.ledger = Ledger()
        self.outcomes = Outcomes(
            state, self.ledger, max_refusals=10, clock=lambda: 0.0, events=EventLog()
        )
        self.retiring = dict.fromkeys(retiring)
        for worker in retiring:
            state.set_flags(worker, 0.0, retiring=True)
        self.may_drop = True
        self.epoch = EPOCH
        self.sent: list[Directive] = []
        self.batches: list[list[Directive]] = []
        self.finished: list[WorkerId] = []
        self.throttled = False
        self.woken = 0
        self.handover = Handover(
            state,
            self.ledger,
            retiring=lambda: self.retiring,
            may_drop=lambda: self.may_drop,
            epoch=lambda: self.epoch,
            new_id=new_ids("h"),
            enter=self._enter,
            dispatch=self._dispatch,
            finish=self._finish,
            throttled=lambda: self.throttled,
            wake=self._wake,
        )
        self.outcomes.watcher = self.handover

    def _enter(self, directives: Sequence[Directive]) -> None:
        for directive in directives:
            self.ledger.add(directive, 0.0)

    async def _dispatch(self, directives: Sequence[Directive]) -> None:
        self.sent += directives
        self.batches.append(list(directives))

    def _wake(self) -> None:
        self.woken += 1

    async def _finish(self, worker: WorkerId) -> None:
        self.finished.append(worker)

    def copy(self, key: str, dest: WorkerId, *, checksum: str = "", epoch: int = EPOCH) -> str:
        """A REPLICATE of ``key`` onto ``dest`` in flight, as a cycle sends it; its id."""
        directive = Directive(
            f"c-{key}-{dest}",
            epoch,
            Op.REPLICATE,
            Key(key),
            dest,
            100,
            checksum or f"sum-{key}",
            sources=(R,),
        )
        self.ledger.add(directive, 0.0)
        return directive.id

    async def answer(
        self, worker: WorkerId, directive_id: str, status: OutcomeStatus = OutcomeStatus.APPLIED
    ) -> None:
        self.outcomes.on_outcome(worker, Outcome(directive_id, status, inventory_version=5))
        await self.settle()

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    def entered_drops(self) -> list[Directive]:
        return [d for d in self.ledger.directives() if d.op is Op.DROP]


async def test_a_confirmed_copy_drops_the_key_from_the_retiring_worker_at_once() -> None:
    rig = Rig(cluster({"r": ["k", "j"], "a": [], "b": ["j"]}))
    await rig.answer(A, rig.copy("k", A))
    (drop,) = rig.sent
    assert (drop.op, drop.key, drop.worker, drop.epoch) == (Op.DROP, "k", R, EPOCH)
    assert drop.holders == (A,)  # the confirmed copy is the one the agent asks to keep it
    assert drop.checksum == "sum-k"
    assert rig.entered_drops() == [drop]  # in the ledger: no cycle plans it again
    assert rig.ledger.in_flight(Key("k")).dropping == {R}
    # Holders that keep copies are named too; the retiring worker never names itself.
    await rig.answer(R, drop.id)
    await rig.answer(A, rig.copy("j", A))
    assert rig.sent[1].holders == (A, B)


async def test_drops_confirmed_while_one_is_out_go_together_once_it_is_answered() -> None:
    """The agent carries out one batch of drops at a time: one message, not one each."""
    rig = Rig(cluster({"r": ["k", "j", "i"], "a": []}))
    await rig.answer(A, rig.copy("k", A))
    await rig.answer(A, rig.copy("j", A))
    await rig.answer(A, rig.copy("i", A))
    assert [d.key for d in rig.sent] == ["k"]
    assert {d.key for d in rig.entered_drops()} == {"k", "j", "i"}  # no cycle plans them again
    await rig.answer(R, rig.sent[0].id, OutcomeStatus.REFUSED)
    assert [d.key for d in rig.sent] == ["k", "j", "i"]
    assert len(rig.batches) == 2


async def test_a_copy_that_failed_or_was_lost_releases_nothing() -> None:
    rig = Rig(cluster({"r": ["k"], "a": [], "b": []}))
    await rig.answer(A, rig.copy("k", A), OutcomeStatus.FAILED)  # e.g. its stream broke
    await rig.answer(B, rig.copy("k", B), OutcomeStatus.REFUSED)
    assert rig.sent == []
    assert rig.entered_drops() == []
    assert rig.state.held_by(R) == {"k"}


async def test_an_answer_of_a_restarted_destination_confirms_nothing() -> None:
    """Its entry was forgotten when the destination registered again (or restarted): the
    applied answer of the old process settles nothing, so it releases nothing."""
    rig = Rig(cluster({"r": ["k"], "a": []}))
    copy = rig.copy("k", A)
    rig.outcomes.forget_in_flight(A)
    await rig.answer(A, copy)
    assert rig.sent == []


async def test_a_copy_of_other_content_or_from_another_epoch_confirms_nothing() -> None:
    rig = Rig(cluster({"r": ["k", "j"], "a": []}))
    await rig.answer(A, rig.copy("k", A, checksum="sum-other"))
    await rig.answer(A, rig.copy("j", A, epoch=EPOCH - 1))
    assert rig.sent == []


async def test_nothing_is_dropped_while_the_amm_may_not_drop() -> None:
    rig = Rig(cluster({"r": ["k"], "a": []}))
    rig.may_drop = False  # fenced, or in its start-up grace
    await rig.answer(A, rig.copy("k", A))
    assert rig.sent == []


async def test_a_copy_on_a_worker_that_does_not_keep_copies_confirms_nothing() -> None:
    state = cluster(
        {"r": ["k", "j", "p"], "a": [], "b": [], "c": []},
        status={"b": WorkerStatus.CLOSING},
        pinned={"r": ["p"]},
    )
    rig = Rig(state, retiring=(R, WorkerId("c")))
    await rig.answer(WorkerId("c"), rig.copy("k", WorkerId("c")))  # retiring itself
    await rig.answer(B, rig.copy("j", B))  # closing
    await rig.answer(A, rig.copy("p", A))  # pinned on the retiring worker: the cycles wait
    assert rig.sent == []


async def test_a_destination_whose_polls_lag_still_confirms_its_own_copy() -> None:
    """An agent busy receiving misses polls, even long enough to be flagged STALE; the outcome
    that just arrived from it shows it alive. A silent *other* holder is not named."""
    state = cluster({"r": ["k"], "a": [], "b": ["k"]})
    state.set_flags(A, 0.0, stale=True)
    state.missed_poll(B)
    rig = Rig(state)
    await rig.answer(A, rig.copy("k", A))
    (drop,) = rig.sent
    assert drop.holders == (A,)


async def test_no_drop_relies_on_a_copy_being_dropped() -> None:
    rig = Rig(cluster({"r": ["k"], "a": []}))
    rig.ledger.add(Directive("d-k-a", EPOCH, Op.DROP, Key("k"), A, 100, "sum-k", holders=(R,)), 0)
    await rig.answer(A, rig.copy("k", A))
    assert rig.sent == []


async def test_a_worker_is_finished_once_every_key_it_holds_was_dropped() -> None:
    rig = Rig(cluster({"r": ["k", "j"], "a": []}))
    await rig.answer(A, rig.copy("k", A))
    await rig.answer(A, rig.copy("j", A))
    await rig.answer(R, rig.sent[0].id)
    assert rig.finished == []  # it still holds j
    await rig.answer(R, rig.sent[1].id, OutcomeStatus.REFUSED)  # pinned meanwhile, say
    assert rig.finished == []
    assert rig.state.held_by(R) == {"k", "j"}  # the state changes with polls only


async def test_the_last_drop_applied_finishes_the_worker() -> None:
    rig = Rig(cluster({"r": ["k", "j"], "a": []}))
    await rig.answer(A, rig.copy("k", A))
    await rig.answer(A, rig.copy("j", A))
    await rig.answer(R, rig.sent[0].id)
    await rig.answer(R, rig.sent[1].id)
    assert rig.finished == [R]


async def test_outcomes_are_not_collected_while_nothing_is_retiring() -> None:
    rig = Rig(cluster({"r": ["k"], "a": []}), retiring=())
    assert not rig.handover.watching
    await rig.answer(A, rig.copy("k", A))
    assert rig.sent == []
    await rig.handover.close()


async def test_a_copy_that_ends_wakes_the_loop_only_when_copies_wait_for_a_slot() -> None:
    rig = Rig(cluster({"r": ["k", "j", "i"], "a": []}))
    await rig.answer(A, rig.copy("k", A))
    assert rig.woken == 0
    rig.throttled = True
    await rig.answer(A, rig.copy("j", A), OutcomeStatus.FAILED)  # a failed one frees it too
    assert rig.woken == 1
    await rig.answer(R, rig.sent[0].id)  # a drop frees no transfer slot
    assert rig.woken == 1
