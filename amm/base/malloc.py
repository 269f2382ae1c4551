"""glibc's allocator, from Python: give free memory back to the system, or use one arena.

Both the AMM and the agents run gRPC, which receives on threads of its own; glibc gives each
thread an arena (up to 8 per core) and returns only the free top of a heap to the system by
itself, so memory freed below a chunk still in use stays resident. ``trim`` (``malloc_trim(0)``)
gives every arena's free pages back. Only glibc has these calls; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

#: ``mallopt``'s parameter number for the most arenas (glibc's ``M_ARENA_MAX``).
M_ARENA_MAX = -8


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


def trim() -> bool:
    """Hand the free memory of the C heap back to the system (glibc's ``malloc_trim(0)``);
    False where there is no such call."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


def use_one_arena() -> bool:
    """Make every thread allocate from glibc's main arena; False where that is not possible.

    Call it before any thread starts (arenas are assigned at a thread's first allocation).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        log.debug("no mallopt (not glibc): allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, 1))


def stats() -> dict[str, int]:
    """The C allocator's bytes in use and free (glibc 2.33+; empty elsewhere)."""
    mallinfo2 = getattr(_libc(), "mallinfo2", None)
    if mallinfo2 is None:
        return {}
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return {
        "malloc_in_use": info.uordblks + info.hblkhd,
        "malloc_free": info.fordblks,
        "malloc_arena": info.arena,
    }
