"""What an agent takes on its AMM's word (``worker_agent.confirm``), against a scripted AMM."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tests.support.waiting import wait_for
from worker_agent.confirm import Confirmations, KnownKey, Membership
from worker_agent.errors import Unavailable
from worker_agent.store import Key


class FakeAmm:
    """Answers GetMembership with ``membership`` (None: unreachable), counting the calls."""

    address = "amm:1"

    def __init__(self, membership: Membership | None) -> None:
        self.membership_now = membership
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def membership(self, epoch: int, version: int) -> Membership | None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        now = self.membership_now
        if now is None:
            raise Unavailable("down")
        return None if (epoch, version) == (now.epoch, now.version) else now

    async def lookup(
        self, keys: Sequence[Key], *, fresh: bool, storing: tuple[str, str] | None = None
    ) -> dict[Key, KnownKey]:
        return {}


def confirmations(amm: FakeAmm, epoch: list[int], min_interval: float = 0.0) -> Confirmations:
    return Confirmations(
        amm,
        epoch=lambda: epoch[0],
        adopt=lambda e: epoch.__setitem__(0, max(epoch[0], e)),
        min_interval=min_interval,
    )


async def test_peers_are_asked_for_once_and_again_when_a_poll_says_they_changed() -> None:
    amm = FakeAmm(Membership(3, 1, frozenset({"a:1", "b:1"})))
    epoch = [3]
    c = confirmations(amm, epoch)
    assert await c.strangers(["a:1", "x:1"]) == ["x:1"]
    assert await c.strangers(["a:1", "b:1"]) == []
    assert amm.calls == 1
    # A poll under another version marks the list stale: the next check asks again.
    amm.membership_now = Membership(3, 2, frozenset({"a:1", "b:1", "c:1"}))
    assert c.note_poll(3, 2)
    assert await c.strangers(["c:1"]) == []
    assert amm.calls == 2


async def test_callers_share_one_call_and_calls_are_spaced() -> None:
    amm = FakeAmm(Membership(3, 1, frozenset({"a:1"})))
    amm.gate = asyncio.Event()
    c = confirmations(amm, [3], min_interval=0.2)
    waiting = [asyncio.create_task(c.strangers([f"x{n}:1"])) for n in range(50)]
    await asyncio.sleep(0.01)
    amm.gate.set()
    assert all(await asyncio.gather(*waiting))
    assert amm.calls == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    await c.strangers(["y:1"])  # a peer it lacks: asked again, but not within 0.2 s
    assert amm.calls == 2
    assert loop.time() - started >= 0.15


async def test_only_the_epoch_the_amm_runs_is_adopted() -> None:
    amm = FakeAmm(Membership(5, 1, frozenset()))
    epoch = [3]
    c = confirmations(amm, epoch)
    await c.confirm_epoch(9)  # a stranger's directive: the AMM runs 5
    assert epoch == [5]
    # A poll of a newer epoch does not count, but has the AMM asked in the background.
    amm.membership_now = Membership(6, 1, frozenset())
    assert not c.note_poll(6, 1)
    await wait_for(lambda: epoch[0], lambda e: e == 6, within=2, what="epoch 6 adopted")
    assert c.note_poll(6, 1)
    await c.close()


async def test_an_amm_that_cannot_be_asked_is_an_error_not_a_yes() -> None:
    c = confirmations(FakeAmm(None), [3])
    with pytest.raises(Unavailable):
        await c.strangers(["a:1"])
    with pytest.raises(Unavailable):
        await c.confirm_epoch(4)
