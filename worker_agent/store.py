"""The agent's in-memory keyed store and the bookkeeping the integrity rules read.

What it covers: immutable values with their size and checksum; an inventory ``version`` with a
bounded changelog, so that the AMM's polls carry only what changed; pin counts; counters of readers
and senders per key; the keys this agent is dropping right now; keep-promise leases.

What it does not: deciding whether an operation is allowed (``integrity``), I/O or waiting. It is
synchronous and never reads a clock: lease expiries are compared with the ``now`` the caller passes.
A precondition the caller should have checked (pinning a key not held) raises ``KeyError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NewType

Key = NewType("Key", str)

#: How many inventory changes the changelog remembers; an older poll gets a full snapshot.
CHANGELOG_LIMIT = 100_000
#: Longest key, in bytes of UTF-8.
MAX_KEY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Value:
    """One stored value; bytes are immutable, so handing them out is safe."""

    key: Key
    data: bytes
    checksum: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a poll reports about one key."""

    key: Key
    size: int
    checksum: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class Changes:
    """The inventory changes after some version, up to ``version``."""

    upserts: tuple[KeyInfo, ...]
    removed: tuple[Key, ...]
    version: int


class Store:
    """Values and their bookkeeping; every change of what a poll reports bumps ``version``."""

    def __init__(self, changelog_limit: int = CHANGELOG_LIMIT) -> None:
        if changelog_limit < 1:
            raise ValueError(f"changelog_limit must be >= 1, got {changelog_limit}")
        self._values: dict[Key, Value] = {}
        self._pins: dict[Key, int] = {}
        self._in_use: dict[Key, int] = {}
        self._dropping: set[Key] = set()
        self._leases: dict[Key, float] = {}
        self._total = 0
        self._version = 0
        self._limit = changelog_limit
        # _log[i] is the key changed by version _base + i + 1.
        self._log: list[Key] = []
        self._base = 0

    # -- values --------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def total_bytes(self) -> int:
        """Managed memory: the sum of the sizes of the values held."""
        return self._total

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[Key]:
        return iter(self._values)

    def get(self, key: Key) -> Value | None:
        return self._values.get(key)

    def info(self, key: Key) -> KeyInfo | None:
        value = self._values.get(key)
        if value is None:
            return None
        return KeyInfo(key, value.size, value.checksum, self._pins.get(key, 0) > 0)

    def snapshot(self) -> list[KeyInfo]:
        """Every key held, ordered by key."""
        return [info for key in sorted(self._values) if (info := self.info(key)) is not None]

    def add(self, key: Key, data: bytes, checksum: str) -> bool:
        """Store a verified value; False when the key is already held (the caller compares)."""
        if key in self._values:
            return False
        self._values[key] = Value(key, data, checksum)
        self._total += len(data)
        self._changed(key)
        return True

    def remove(self, key: Key) -> bool:
        """Forget a value with its pins and leases; False when it was not held."""
        value = self._values.pop(key, None)
        if value is None:
            return False
        self._total -= value.size
        self._pins.pop(key, None)
        self._leases.pop(key, None)
        self._changed(key)
        return True

    # -- pins, readers, drops, leases -------------------------------------------------------------

    def pins(self, key: Key) -> int:
        return self._pins.get(key, 0)

    def pin(self, key: Key) -> int:
        """Add a pin; the version moves only when the key becomes pinned (what polls show)."""
        if key not in self._values:
            raise KeyError(key)
        count = self._pins.get(key, 0) + 1
        self._pins[key] = count
        if count == 1:
            self._changed(key)
        return count

    def unpin(self, key: Key) -> int:
        count = self._pins.get(key, 0)
        if count == 0:
            raise KeyError(key)
        if count == 1:
            del self._pins[key]
            self._changed(key)
        else:
            self._pins[key] = count - 1
        return count - 1

    def in_use(self, key: Key) -> int:
        """How many reads or sends of the key are streaming right now."""
        return self._in_use.get(key, 0)

    def begin_use(self, key: Key) -> None:
        if key not in self._values:
            raise KeyError(key)
        self._in_use[key] = self._in_use.get(key, 0) + 1

    def end_use(self, key: Key) -> None:
        count = self._in_use.get(key, 0) - 1
        if count > 0:
            self._in_use[key] = count
        else:
            self._in_use.pop(key, None)

    def is_dropping(self, key: Key) -> bool:
        return key in self._dropping

    def mark_dropping(self, key: Key) -> None:
        self._dropping.add(key)

    def unmark_dropping(self, key: Key) -> None:
        self._dropping.discard(key)

    def promise(self, key: Key, until: float) -> float:
        """Promise to keep a held key until ``until`` (extending, never shortening); the expiry."""
        if key not in self._values:
            raise KeyError(key)
        expires = max(until, self._leases.get(key, until))
        self._leases[key] = expires
        return expires

    def promised_until(self, key: Key, now: float) -> float | None:
        """The expiry of the key's active keep-promise, or None."""
        expires = self._leases.get(key)
        return expires if expires is not None and expires > now else None

    # -- inventory versioning -----------------------------------------------------------------

    def changes_since(self, since: int) -> Changes | None:
        """What changed after version ``since``; None when the changelog no longer reaches back
        that far (or ``since`` is from the future), so the caller needs a full snapshot."""
        if since < self._base or since > self._version:
            return None
        changed = dict.fromkeys(self._log[since - self._base :])
        upserts: list[KeyInfo] = []
        removed: list[Key] = []
        for key in changed:
            info = self.info(key)
            if info is None:
                removed.append(key)
            else:
                upserts.append(info)
        return Changes(tuple(upserts), tuple(removed), self._version)

    def _changed(self, key: Key) -> None:
        self._version += 1
        self._log.append(key)
        # Trimming by half the limit at a time keeps appends amortised O(1).
        if len(self._log) >= self._limit + max(1, self._limit // 2):
            cut = len(self._log) - self._limit
            del self._log[:cut]
            self._base += cut
