"""The AMM's epoch fence: ids unique to each run, and fencing noticed once."""

from __future__ import annotations

from amm_service.decisions.epoch import EpochFence
from amm_service.runtime.records.state import MEMORY, StateStore


class _Poller:
    """What the fence reads from the poller: the newest epoch agents reported."""

    def __init__(self) -> None:
        self.epoch = 0
        self.newest_agent_epoch = 0


def _no_jump(n: int) -> int:
    return 0


def test_two_amms_under_one_epoch_still_issue_distinct_directive_ids() -> None:
    """Issue 10: ids were ``e<epoch>.<n>``, so two AMMs that shared an epoch issued the same
    ids, and agents deduplicate directives by id."""
    with StateStore(MEMORY, draw=_no_jump) as one, StateStore(MEMORY, draw=_no_jump) as two:
        first, second = EpochFence(one, _Poller()), EpochFence(two, _Poller())
        first.begin()
        second.begin()
        assert first.epoch == second.epoch == 1
        ids = [first.new_id() for _ in range(3)] + [second.new_id() for _ in range(3)]
        assert len(set(ids)) == 6
        assert all(i.startswith("e1.") for i in ids)


def test_fencing_is_noticed_once_and_kept() -> None:
    poller = _Poller()
    with StateStore(MEMORY) as store:
        fence = EpochFence(store, poller)
        fence.begin()
        poller.newest_agent_epoch = fence.epoch
        assert fence.check_fenced() is None
        assert fence.fenced_by == 0
        poller.newest_agent_epoch = fence.epoch + 3
        assert fence.check_fenced() == fence.epoch + 3
        assert fence.check_fenced() is None, "said once"
        assert fence.fenced_by == fence.epoch + 3
