"""Huge pages for large values received over the bulk port (``worker_agent.huge_pages``): a real
transfer on loopback, with the kernel's own account of the memory (``/proc/self/smaps``)."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
from pathlib import Path

import pytest

from amm.base.checksum import checksum
from worker_agent import bulk, huge_pages
from worker_agent.bulk import BulkServer

#: Above glibc's largest mmap threshold (32 MiB), so that the value gets memory of its own, not
#: memory of the heap that an earlier value may have touched already.
SIZE = 40 * 1024 * 1024 + 123
DATA = os.urandom(SIZE)
_VMA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def huge_bytes_within(address: int, size: int) -> int:
    """Bytes of ``[address, address + size)`` backed by transparent huge pages, per the kernel:
    the ``AnonHugePages`` of every mapping that lies within it (``madvise`` splits the value's
    mapping at what it asked about)."""
    total = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        found = _VMA.match(line)
        if found is not None:
            start, end = int(found[1], 16), int(found[2], 16)
            inside = address <= end and start <= address + size
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def _spare_huge_pages(count: int) -> bool:
    found = huge_pages.support()
    if found is None:
        return False
    info = huge_pages.BUDDYINFO.read_text(encoding="ascii")
    return huge_pages.free_huge_pages(info, found.order) >= 4 * count


needs_huge_pages = pytest.mark.skipif(
    not _spare_huge_pages(SIZE // (2 * 1024 * 1024)),
    reason="transparent huge pages are not offered on madvise here, or none are free",
)


@needs_huge_pages
async def test_a_large_value_received_over_the_bulk_port_lands_in_huge_pages() -> None:
    server = await BulkServer.start("127.0.0.1", idle_timeout=5.0)
    try:
        offer = server.offer(DATA)
        data, digest = await bulk.receive("127.0.0.1", offer.port, offer.ticket, SIZE, 5.0)
        await offer.sent(claim_timeout=5.0)
    finally:
        await server.close()
    assert data == DATA
    assert digest == checksum(DATA)
    found = huge_pages.support()
    assert found is not None
    address = id(data) + bulk._DATA_OFFSET
    whole = (address + SIZE) // found.huge_bytes - -(-address // found.huge_bytes)
    assert huge_bytes_within(address, SIZE) >= whole * found.huge_bytes


@needs_huge_pages
@pytest.mark.parametrize("spare", [False, True])
def test_huge_pages_are_asked_for_only_while_the_kernel_has_them_to_spare(
    spare: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked when none is free, the kernel would compact memory on the spot to make one."""
    if not spare:
        scarce = tmp_path / "buddyinfo"
        scarce.write_text(
            "Node 0, zone  Normal  900  800  700  600  500  400  300  200  100  3  0\n"
        )
        monkeypatch.setattr(huge_pages, "BUDDYINFO", scarce)
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    with mmap.mmap(-1, SIZE, flags=private) as memory:  # fresh, as malloc's: never advised
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        assert huge_pages.advise(address, SIZE) is spare
        memory[:] = DATA
        huge = huge_bytes_within(address, SIZE)
        assert (huge > 0) is spare


def test_small_values_are_not_advised() -> None:
    found = huge_pages.support()
    step = found.huge_bytes if found is not None else 2 * 1024 * 1024
    # Within one huge page whatever the alignment: nothing whole to ask for.
    assert not huge_pages.advise(step + mmap.PAGESIZE, step - 2 * mmap.PAGESIZE)


def test_free_huge_pages_counts_every_larger_block_by_its_share() -> None:
    info = (
        "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1"
        "      1      3 \n"
        "Node 0, zone    DMA32      2      4      2      2      1      2      0      3      3"
        "      1    753 \n"
        "Node 0, zone   Normal    744   1075  14609  13979  10403   5435   2531   1216    574"
        "    172     60 \n"
    )
    # Order 9 (2 MiB of 4 KiB pages): the order-9 blocks, and each order-10 block twice.
    assert huge_pages.free_huge_pages(info, 9) == (1 + 3 * 2) + (1 + 753 * 2) + (172 + 60 * 2)
    assert huge_pages.free_huge_pages(info, 10) == 3 + 753 + 60
    assert huge_pages.free_huge_pages("", 9) == 0
    assert huge_pages.free_huge_pages("garbage line\n", 9) == 0
