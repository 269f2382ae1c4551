"""Directive ids, stored compactly.

Every id the AMM issues is a prefix shared by the whole run (``e<epoch>.<run>.``) and a sequence
number (``EpochFence.new_id``). Stored as strings, the ids of a big cycle cost more than the rest
of what is kept of its directives (78 bytes each, 300,000 in flight at once), so what keeps ids
keeps them as a prefix and a number, and builds the string again only when it is needed (on the
wire, in an outcome, on a refusal). Any other id (tests, other AMMs) is kept as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_DIGITS = "0123456789"


_last = [""]
"""The prefix split off last: nearly every id has it, and handing back that one string object
saves building (and hashing) a new one per id."""


def split_id(directive_id: str) -> tuple[str, int] | None:
    """``(prefix, number)`` such that ``prefix + str(number) == directive_id``, or None when no
    such split exists (no trailing digits, or a leading zero that ``str`` would not give back)."""
    prefix = _last[0]
    if prefix and directive_id.startswith(prefix):
        digits = directive_id[len(prefix) :]
        if digits.isascii() and digits.isdigit() and (digits[0] != "0" or len(digits) == 1):
            return prefix, int(digits)
    prefix = directive_id.rstrip(_DIGITS)
    digits = directive_id[len(prefix) :]
    if not digits or (digits[0] == "0" and len(digits) > 1):
        return None
    _last[0] = prefix
    return prefix, int(digits)


#: How far past what an ``IdSet`` spans an id may land before it is kept apart as a string (a
#: byte per number in between would cost more than the string).
_SPAN = 1 << 20


class _Numbers:
    """The numbers held under one prefix: a byte per number from ``base`` on."""

    __slots__ = ("base", "count", "flags", "low")

    def __init__(self, base: int) -> None:
        self.base = base
        self.flags = bytearray()
        self.count = 0
        self.low = 0
        """No flag is set below this offset (what ``_trim`` may cut)."""


class IdSet:
    """A set of directive ids at about a byte per id when they are numbered close together (the
    ids of the directives sent on one stream and not answered yet), instead of ~120 in a set of
    strings."""

    __slots__ = ("_numbers", "_others")

    def __init__(self) -> None:
        self._numbers: dict[str, _Numbers] = {}
        self._others: set[str] = set()

    def __len__(self) -> int:
        return len(self._others) + sum(n.count for n in self._numbers.values())

    def __contains__(self, directive_id: object) -> bool:
        if not isinstance(directive_id, str):
            return False
        if directive_id in self._others:
            return True
        split = split_id(directive_id)
        if split is None:
            return False
        numbers = self._numbers.get(split[0])
        if numbers is None:
            return False
        at = split[1] - numbers.base
        return 0 <= at < len(numbers.flags) and numbers.flags[at] == 1

    def add(self, directive_id: str) -> None:
        split = split_id(directive_id)
        if split is None:
            self._others.add(directive_id)
            return
        self.add_number(*split)

    def add_number(self, prefix: str, number: int) -> None:
        """``add`` of the id ``prefix + str(number)``."""
        numbers = self._numbers.get(prefix)
        if numbers is None:
            numbers = self._numbers[prefix] = _Numbers(number)
        flags = numbers.flags
        at = number - numbers.base
        if at < 0:
            if -at > _SPAN:
                self._others.add(prefix + str(number))
                return
            numbers.flags = flags = bytearray(-at) + flags
            numbers.base, numbers.low, at = number, 0, 0
        elif at >= len(flags):
            if at - len(flags) > _SPAN:
                self._others.add(prefix + str(number))
                return
            flags.extend(bytes(at + 1 - len(flags)))
        if not flags[at]:
            flags[at] = 1
            numbers.count += 1
            numbers.low = min(numbers.low, at)

    def add_numbers(self, prefix: str, numbers: Iterable[int]) -> None:
        """``add_number`` of each of ``numbers`` (one message's directives: a call less each)."""
        batch = list(numbers)
        if not batch:
            return
        lowest, highest = min(batch), max(batch)
        self.add_number(prefix, lowest)  # makes room down to it (or keeps it apart)
        self.add_number(prefix, highest)
        held = self._numbers[prefix]
        base, flags, count = held.base, held.flags, held.count
        if lowest < base or highest - base >= len(flags):  # kept apart: one at a time
            for number in batch:
                self.add_number(prefix, number)
            return
        for number in batch:
            at = number - base
            if not flags[at]:
                flags[at] = 1
                count += 1
        held.count = count
        held.low = min(held.low, lowest - base)

    def discard(self, directive_id: str) -> bool:
        """Remove ``directive_id``; whether it was there."""
        found = False
        if self._others and directive_id in self._others:
            self._others.discard(directive_id)
            found = True
        split = split_id(directive_id)
        if split is None:
            return found
        numbers = self._numbers.get(split[0])
        if numbers is None:
            return found
        at = split[1] - numbers.base
        flags = numbers.flags
        if not 0 <= at < len(flags) or not flags[at]:
            return found
        flags[at] = 0
        numbers.count -= 1
        if numbers.count == 0:
            del self._numbers[split[0]]
        elif at == numbers.low:
            self._trim(numbers)
        return True

    def discard_all(self, directive_ids: Iterable[str]) -> None:
        """``discard`` of each of ``directive_ids`` (the answers of a batch: most are numbers
        under one prefix, taken here without a call each)."""
        if len(self._numbers) != 1 or self._others:
            for directive_id in directive_ids:
                self.discard(directive_id)
            return
        ((prefix, numbers),) = self._numbers.items()
        start, base, flags = len(prefix), numbers.base, numbers.flags
        end, low, count = len(flags), numbers.low, numbers.count
        slow = []
        for directive_id in directive_ids:
            digits = directive_id[start:]
            if (
                directive_id.startswith(prefix)
                and digits.isascii()
                and digits.isdigit()
                and (digits[0] != "0" or len(digits) == 1)
            ):
                at = int(digits) - base
                if 0 <= at < end and flags[at]:
                    flags[at] = 0
                    count -= 1
                    if at == low:
                        low = flags.find(1, low)
                        low = end if low < 0 else low
                continue
            slow.append(directive_id)
        numbers.count, numbers.low = count, low
        if count == 0:
            del self._numbers[prefix]
        else:
            self._trim(numbers)
        for directive_id in slow:
            self.discard(directive_id)

    def _trim(self, numbers: _Numbers) -> None:
        """Move ``low`` past the cleared front; cut it off once it is half the flags."""
        flags = numbers.flags
        low = flags.find(1, numbers.low)
        numbers.low = low if low >= 0 else len(flags)
        if numbers.low > 4096 and numbers.low * 2 > len(flags):
            del flags[: numbers.low]
            numbers.base += numbers.low
            numbers.low = 0

    def __iter__(self) -> Iterator[str]:
        yield from list(self._others)
        for prefix, numbers in list(self._numbers.items()):
            flags, base = numbers.flags, numbers.base
            at = flags.find(1, numbers.low)
            while at >= 0:
                yield prefix + str(base + at)
                at = flags.find(1, at + 1)

    def clear(self) -> None:
        self._numbers.clear()
        self._others.clear()
