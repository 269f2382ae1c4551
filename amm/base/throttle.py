"""One log line per client and interval, however often the client misbehaves.

A misconfigured or hostile client can call in a tight loop (hundreds of undecodable requests or
denied calls a second); a line for each would flood the log and cost more than the call. Both
servers' guards (``amm.base.guard`` for undecodable requests, ``amm.base.security.authz`` for
denials) let the first through, count the rest, and say how many were held back at the next.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable

#: Keys remembered at most (the least recently heard of are forgotten first).
MAX_KEYS = 4096


class Throttle:
    """Admits one event per key per ``interval`` seconds and counts the ones it holds back."""

    def __init__(
        self,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        # key -> [when its last event was admitted, events held back since]
        self._seen: collections.OrderedDict[Hashable, list[float]] = collections.OrderedDict()

    def admit(self, key: Hashable) -> int | None:
        """None to stay quiet about this event; else how many of ``key``'s were held back since
        the last one admitted."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None:
            self._seen.move_to_end(key)
            if now - seen[0] < self._interval:
                seen[1] += 1
                return None
        held_back = int(seen[1]) if seen is not None else 0
        self._seen[key] = [now, 0]
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return held_back


def client_host(peer: str) -> str:
    """The client's host from ``context.peer()`` (``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        return rest.rpartition(":")[0] or rest
    return peer
