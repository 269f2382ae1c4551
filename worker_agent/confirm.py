"""What an agent registered with an AMM takes on that AMM's word alone: a newer epoch, which
peers are workers of the cluster, and what content a key has elsewhere.

Anyone who can reach an agent can call it. Believing its callers, an agent let one Poll or
directive with a huge epoch fence the real AMM off for good, dropped the last copy of a key on
the promise of a "keeper" that was the caller's own server, and fetched from any address a Get
or a REPLICATE named. So:

1. The epoch moves only to what the AMM confirms (RegisterWorker's answer, GetMembership). A
   directive of a newer epoch waits for one GetMembership call and is refused unless the AMM
   runs that epoch; a poll of a newer epoch makes the agent ask in the background (until then
   it does not count as the AMM's poll).
2. A peer is believed only when the AMM lists it as a registered worker. The list is kept and
   asked for again when a poll says it changed (``PollRequest.membership_version``) or a peer is
   named that it lacks.
3. The AMM is asked once at a time (callers share the answer under way) and at most once every
   ``min_interval``, so that strangers' calls cost it little.
4. Keys are immutable cluster-wide: before a key this agent lacks is stored (Put, PutMany, a
   Get that keeps a replica), the AMM says what content the cluster holds under it
   (``lookup``), and other content is refused. The AMM learns of a key at its next poll, so two
   puts of different content on two agents within one interval both pass; the AMM then reports
   the key as conflicting and neither copies nor drops it.

Not covered: callers that know the current epoch and name registered workers. Without
authentication (the role work) the agent cannot tell them from its AMM. The AMM port raises
``Unavailable`` when the AMM cannot be asked; so do these methods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker_agent.store import Key

log = logging.getLogger(__name__)

#: The least time between two calls to the AMM, in seconds.
MIN_INTERVAL = 0.25
#: Most keys in one LookupKeys call (the AMM's limit per request).
LOOKUP_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Membership:
    """The AMM's epoch and the addresses of its registered workers, at a version."""

    epoch: int
    version: int
    workers: frozenset[str]


@dataclass(frozen=True, slots=True)
class KnownKey:
    """What the AMM knows of a key: its content (``size``, ``checksum``), the workers holding
    that content and those holding other content under the key."""

    size: int
    checksum: str
    holders: tuple[str, ...]
    conflicting: tuple[str, ...] = ()


class AmmPort(Protocol):
    """The agent's calls to its AMM (``agent.Agent`` makes them over gRPC)."""

    @property
    def address(self) -> str: ...

    async def membership(self, epoch: int, version: int) -> Membership | None:
        """The current membership, or None when (epoch, version) are still current."""
        ...

    async def lookup(
        self, keys: Sequence[Key], *, fresh: bool, storing: tuple[str, str] | None = None
    ) -> dict[Key, KnownKey]:
        """What the AMM knows of ``keys`` (at most ``LOOKUP_KEYS``); unknown keys are absent.
        ``storing``: (address, incarnation) of this agent when it asks before storing them for
        a Put, so that the AMM reports them lost if it dies before a poll lists them."""
        ...


class Confirmations:
    """The epoch and the peers the agent's AMM has confirmed; see the module docstring."""

    def __init__(
        self,
        port: AmmPort,
        *,
        epoch: Callable[[], int],
        adopt: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self._port = port
        self._epoch = epoch
        self._adopt = adopt
        self._clock = clock
        self._min_interval = min_interval
        self._membership: Membership | None = None
        self._stale = True
        self._last = -min_interval
        self._asking: asyncio.Task[None] | None = None

    @property
    def amm(self) -> str:
        return self._port.address

    def note_poll(self, epoch: int, version: int) -> bool:
        """Whether a poll's ``epoch`` is confirmed already. A poll under another membership
        version marks the list stale; one of a newer epoch also has the AMM asked now, in the
        background, so that the AMM's first directives after its restart need not wait."""
        known = self._membership
        if known is None or (epoch, version) != (known.epoch, known.version):
            self._stale = True
        if epoch <= self._epoch():
            return True
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._call(), name="agent membership")
            self._asking.add_done_callback(_quietly)
        return False

    async def confirm_epoch(self, epoch: int) -> None:
        """Ask the AMM once, unless ``epoch`` is confirmed already or the AMM answered a
        moment ago with nothing new since: the caller judges the epoch afterwards."""
        if epoch <= self._epoch():
            return
        if not self._stale and self._clock() - self._last < self._min_interval:
            return  # it answered just now: asking again would tell nothing new
        await self._ask()

    async def strangers(self, addresses: Iterable[str]) -> list[str]:
        """Those of ``addresses`` that are not registered workers, asking the AMM (once at
        most) when the list is stale or lacks one of them."""
        named = list(dict.fromkeys(addresses))
        asked = False
        while True:
            known = self._membership
            if known is not None and (asked or not self._stale):
                unknown = [address for address in named if address not in known.workers]
                if not unknown or asked:
                    return unknown
            await self._ask()
            asked = True

    async def lookup(
        self, keys: Sequence[Key], *, fresh: bool = False, storing: tuple[str, str] | None = None
    ) -> dict[Key, KnownKey]:
        """What the AMM knows of ``keys``, in calls of at most ``LOOKUP_KEYS`` keys."""
        known: dict[Key, KnownKey] = {}
        for start in range(0, len(keys), LOOKUP_KEYS):
            part = keys[start : start + LOOKUP_KEYS]
            known.update(await self._port.lookup(part, fresh=fresh, storing=storing))
        return known

    async def close(self) -> None:
        task, self._asking = self._asking, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _ask(self) -> None:
        """One GetMembership call, shared with every caller that needs one meanwhile."""
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._call(), name="agent membership")
            self._asking.add_done_callback(_quietly)
        await asyncio.shield(self._asking)

    async def _call(self) -> None:
        wait = self._last + self._min_interval - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
        self._stale = False  # a poll marking it stale while we ask makes the next caller ask
        known = self._membership
        try:
            answer = await self._port.membership(
                known.epoch if known else 0, known.version if known else 0
            )
        except BaseException:
            self._stale = True
            raise
        finally:
            self._last = self._clock()
        if answer is not None:
            if known is None or answer.workers != known.workers:
                log.debug(
                    "the AMM lists %d workers (version %d)", len(answer.workers), answer.version
                )
            self._membership = answer
        current = self._membership
        if current is not None and current.epoch > self._epoch():
            log.info("the AMM at %s confirms epoch %d", self.amm, current.epoch)
            self._adopt(current.epoch)


def _quietly(task: asyncio.Task[None]) -> None:
    """A background ask that failed is asked again by the next caller that needs it."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("asking the AMM failed: %s", task.exception())
