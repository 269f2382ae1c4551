"""Transparent huge pages for a large value's new memory, when the kernel has them to spare.

A value received over the bulk port is written into memory no one touched before, and on Linux
each 4 KiB page of it is faulted in by the kernel's copy: a 1 GiB replication made 262,144 page
faults on the receivers, a quarter of their CPU (``perf``: the fault entry, charging each page
to the memory cgroup, zeroing it). Asked with ``madvise(MADV_HUGEPAGE)``, the kernel backs each
aligned 2 MiB of the value with one huge page at one fault: on the project's 2-core VM a bulk
transfer's sender and receiver together went from about 1.95 to 1.45 CPU-seconds per GiB.

Asked when none is free, though, the kernel compacts memory to make one, on the spot (the
``defrag`` setting ``madvise``, the default), which once cost more than it saved. So ``advise``
asks only while the free huge pages (``/proc/buddyinfo``: free blocks of the huge page's order
or larger) are at least twice what the value needs; otherwise the value gets ordinary pages, as
before. It asks only where the system's setting is ``madvise``: under ``always`` the pages are
huge already, under ``never`` they cannot be. Nothing here changes the bytes, only how the
memory that holds them is mapped; every failure leaves the memory as it was.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Where the kernel tells whether and how transparent huge pages are used.
THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
#: Free blocks of each order, per memory zone.
BUDDYINFO = Path("/proc/buddyinfo")
#: Free huge pages asked for, as a multiple of those the value needs.
SPARE_FACTOR = 2


@dataclass(frozen=True, slots=True)
class Support:
    """How this system can be asked for huge pages."""

    #: Bytes of a huge page (``hpage_pmd_size``).
    huge_bytes: int
    #: The buddy allocator's order of a huge page: 9 for 2 MiB over 4 KiB pages.
    order: int
    #: libc's ``madvise(address, length, advice)``.
    madvise: Callable[[int, int, int], int]


@functools.cache
def support() -> Support | None:
    """How to ask, or None when asking would do nothing here (read once)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        enabled = (THP_DIR / "enabled").read_text(encoding="ascii")
        huge_bytes = int((THP_DIR / "hpage_pmd_size").read_text(encoding="ascii"))
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, ValueError, AttributeError):
        return None
    if "[madvise]" not in enabled or huge_bytes <= mmap.PAGESIZE:
        return None
    ratio = huge_bytes // mmap.PAGESIZE
    if ratio & (ratio - 1):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return Support(huge_bytes, ratio.bit_length() - 1, madvise)


def free_huge_pages(buddyinfo: str, order: int) -> int:
    """Huge pages of ``order`` the buddy allocator could hand out now, from ``buddyinfo``'s
    text: each free block of that order or larger holds ``2 ** (its order - order)``."""
    free = 0
    for line in buddyinfo.splitlines():
        _, _, counts = line.partition("zone")
        for block_order, count in enumerate(counts.split()[1:]):
            if block_order >= order and count.isdigit():
                free += int(count) << (block_order - order)
    return free


def advise(address: int, size: int) -> bool:
    """Ask for huge pages under the whole huge pages within ``[address, address + size)``,
    memory not yet touched; True when asked. Only while enough are free (``SPARE_FACTOR``)."""
    found = support()
    if found is None:
        return False
    step = found.huge_bytes
    start = -(-address // step) * step
    end = (address + size) // step * step
    if end <= start:
        return False
    try:
        info = BUDDYINFO.read_text(encoding="ascii")
    except OSError:
        return False
    if free_huge_pages(info, found.order) < SPARE_FACTOR * (end - start) // step:
        return False
    if found.madvise(start, end - start, mmap.MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
        return False
    return True
