"""The checksum of the wire contract: lowercase hexadecimal SHA-256.

SHA-256 rather than a faster non-cryptographic hash because every language an agent may be written
in ships it, and it is hardware-accelerated on current CPUs.
"""

from __future__ import annotations

import hashlib


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum of a whole value."""
    return hashlib.sha256(data).hexdigest()


class StreamingChecksum:
    """The checksum of a value that arrives in chunks."""

    __slots__ = ("_hash", "size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
