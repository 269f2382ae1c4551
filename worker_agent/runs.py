"""A message's repeated field of sub-messages as bytes: built from runs of alike elements and read
back as runs, in a few C-level steps instead of a Python step per element.

A keeper's answer to a batch of keep-promises is thousands of alike answers (the same lease
granted): building each in place, or reading each field of each, cost microseconds per element,
a large share of an agent's CPU per drop. The wire encoding of a repeated sub-message field is the
concatenation of its elements, each framed as ``tag, length, bytes``, so alike elements are alike
bytes: a batch is joined from the framed encoding of each kind, handed to the real parser
(``MergeFromString``), and read back by comparing bytes, each element's fields read once per kind.
What does not have the expected shape is left to the caller's element-by-element path.
"""

from __future__ import annotations

#: Wire type of a length-delimited field (strings, bytes, sub-messages).
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def framed(field: int, encoded: bytes) -> bytes:
    """``encoded`` (a sub-message's serialization) as one element of the repeated field number
    ``field``: joined, such elements are the field's wire encoding."""
    return _varint(field << 3 | _LENGTH_DELIMITED) + _varint(len(encoded)) + encoded


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """The varint at ``offset`` and the offset after it; ValueError past the end or too long."""
    value = shift = 0
    while shift < 64:
        byte = data[offset]  # IndexError past the end
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7
    raise ValueError("a varint longer than 64 bits")


def runs(data: bytes, field: int) -> list[tuple[bytes, int]] | None:
    """The elements of ``data`` (a serialized message holding nothing but the repeated
    sub-message field number ``field``) as runs of byte-identical elements: each element's
    serialization and how many follow in a row, in order. None when ``data`` holds anything
    else or is cut short (the caller parses it as usual).

    Each run costs a few comparisons of bytes (doubling, then halving the count), however long."""
    tag = _varint(field << 3 | _LENGTH_DELIMITED)
    found: list[tuple[bytes, int]] = []
    offset, total = 0, len(data)
    try:
        while offset < total:
            if not data.startswith(tag, offset):
                return None
            length, start = _read_varint(data, offset + len(tag))
            end = start + length
            if end > total:
                return None
            element = data[offset:end]
            found.append((data[start:end], _repeats(data, offset, element)))
            offset += found[-1][1] * len(element)
    except (IndexError, ValueError):
        return None
    return found


def _repeats(data: bytes, offset: int, element: bytes) -> int:
    """How many copies of ``element`` follow one another in ``data`` from ``offset`` (one at
    least: the caller read it there)."""
    size = len(element)
    most = (len(data) - offset) // size
    good, step = 1, 1
    # Doubling: ``good`` copies match; find a count that does not (or the most there can be).
    while good < most:
        probe = min(most, good + step)
        if not data.startswith(element * (probe - good), offset + good * size):
            bad = probe
            break
        good, step = probe, step * 2
    else:
        return good
    # Halving between ``good`` (matches) and ``bad`` (does not).
    while bad - good > 1:
        middle = (good + bad) // 2
        if data.startswith(element * (middle - good), offset + good * size):
            good = middle
        else:
            bad = middle
    return good
