"""The start-up grace: a restarted AMM drops nothing until it has heard from the workers it knew.

A freshly started AMM knows, from its state file, the workers of its previous run, but not what
they hold until they answer a poll. A drop planned meanwhile could remove a replica whose other
copies sit on a worker it cannot see yet, so no drop is issued while the grace lasts. It ends

1. when every known worker has answered a poll (or left: unregistered, or declared dead), or
2. when ``startup_grace`` has passed; the liveness rules then deal with those still silent.

A fresh AMM with no known workers has no grace at all. Pure: the caller passes ``now`` (monotonic).
"""

from __future__ import annotations

from collections.abc import Iterable

from amm_service.decisions.view import WorkerId, WorkerView


class StartupGrace:
    """Whether drops are still held back; ``update`` says once why the grace ended."""

    def __init__(self, known: Iterable[WorkerId], *, until: float) -> None:
        self._waiting = set(known)
        self._until = until
        self._active = bool(self._waiting)

    @property
    def active(self) -> bool:
        return self._active

    @property
    def waiting(self) -> frozenset[WorkerId]:
        """Known workers that have not answered a poll yet."""
        return frozenset(self._waiting) if self._active else frozenset()

    def update(self, workers: Iterable[WorkerView], now: float) -> str | None:
        """Take in who has answered; returns why the grace ended when it ends now, else None."""
        if not self._active:
            return None
        present = {ws.address: ws for ws in workers}
        self._waiting = {w for w in self._waiting if w in present and present[w].last_poll is None}
        if not self._waiting:
            self._active = False
            return "every worker known before the restart has reported (or left)"
        if now >= self._until:
            self._active = False
            silent = ", ".join(sorted(self._waiting)[:10])
            more = f" and {len(self._waiting) - 10} more" if len(self._waiting) > 10 else ""
            return (
                f"the grace period passed; {len(self._waiting)} known worker(s) never reported: "
                f"{silent}{more}"
            )
        return None
