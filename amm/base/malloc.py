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
    False where there is no such call. After churn (values put, copied and forgotten),
    ``benchmarks/soak.py`` found 12-15 MiB of an agent's 81 MiB free but resident, back to the
    system with one trim."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


def use_one_arena() -> bool:
    """Make every thread allocate from glibc's main arena (``MALLOC_ARENA_MAX=1``, applied by
    the process itself so that it holds however the process is started); False where that is
    not possible. Call it before any thread starts (arenas are assigned at a thread's first
    allocation).

    The agents use it. gRPC receives on its own event-engine threads, and memory freed in their
    arenas is trimmed back to the kernel, so every message received lands in fresh pages; on a
    virtual machine a page fault with its zeroing costs more than the copy that caused it.
    Measured on the project's 2-core VM: a bare gRPC receiver made 0.5 to 1 minor fault per 4
    KiB received and spent 1.1 CPU s per GB, with one arena 0.03 to 0.2 faults and 0.75 s; an
    agent replicating 64 MiB values (``benchmarks/bench_transfer.py``) went from 1.8 to 1.0-1.3
    faults per 4 KiB (one is the stored value's own memory) and from 3.0 to 2.5 CPU s per GB.
    One arena also keeps the process memory that the agent reports to the AMM closer to what it
    holds. An agent has few threads (the event loop, gRPC's, a hashing thread or two), so they
    share the arena's lock at no measurable cost.
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
