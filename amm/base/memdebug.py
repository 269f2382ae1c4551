"""An opt-in memory probe for soaks: tells a leak (Python objects kept forever) from a
high-water mark (allocator arenas, gRPC's native buffers) without attaching a debugger.

Off unless ``AMM_MEMDEBUG`` names a directory. Then a daemon thread of the AMM or agent appends
one JSON line every ``AMM_MEMDEBUG_EVERY`` seconds (default 10) to ``<dir>/<pid>.jsonl``:

* ``rss``: resident bytes (``/proc/self/status``);
* ``traced``/``tracemalloc_overhead``: bytes of Python objects alive (tracemalloc, started here
  with one frame) and tracemalloc's own bookkeeping; RSS minus both is the native share (the C
  allocator's free-but-resident memory, gRPC's and protobuf's buffers, the interpreter);
* ``types``: object counts of the most numerous types (``gc``) and ``containers``: the largest
  dicts, sets, lists and deques with the attribute that holds them, so that a structure that
  grows per key or per round shows up by name (of the objects not frozen: ``gc.freeze`` hides
  a big AMM's heap from ``gc.get_objects``; ``gc_frozen`` counts them);
* ``sites``: the allocation sites holding the most bytes (tracemalloc, by line);
* ``rss_by``: resident bytes by kind of mapping (``rss_by_mapping``);
* ``py_arenas``/``py_blocks_in_use``/``py_blocks_free``/``py_unused_pools``: CPython's
  small-object allocator, whose 1 MiB arenas go back to the system only when wholly empty;
* ``malloc_in_use``/``malloc_free``: glibc's ``mallinfo2``, bytes the C allocator has handed out
  and bytes it holds free (fragmentation: free but resident unless trimmed). With
  ``AMM_MEMDEBUG_TRIM=1`` the probe calls ``malloc_trim(0)`` first and reports ``rss_untrimmed``
  too: what a trim would give back.

``benchmarks/soak.py --heap`` turns it on and compares the lines over time. Tracemalloc slows
the process (about 1.5-2x on allocation-heavy paths) and is never on in normal runs.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any

from amm.base import malloc

ENV = "AMM_MEMDEBUG"
EVERY_ENV = "AMM_MEMDEBUG_EVERY"
TRIM_ENV = "AMM_MEMDEBUG_TRIM"
#: ``0``: no tracemalloc. CPython then reports its small-object arenas (it does not while
#: tracemalloc hooks the allocator), and the process runs at its normal speed.
TRACE_ENV = "AMM_MEMDEBUG_TRACE"
#: How many of the most numerous types, largest containers and heaviest sites a line lists.
TOP = 25
#: Containers shorter than this are not worth naming.
MIN_CONTAINER = 64

_CONTAINERS = (dict, set, list, collections.deque, collections.OrderedDict)


def threads() -> int:
    """Threads of this process (0 where ``/proc`` has none)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def rss(pid: int | str = "self") -> int:
    """The resident set size of ``pid`` (this process by default) in bytes (0 where ``/proc``
    has none, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: glibc's non-main arenas are heaps aligned to their largest size (64 MiB on 64-bit).
_GLIBC_HEAP_ALIGN = 64 * 2**20
#: A thread's stack (the default ``ulimit -s``), its guard page a mapping of its own.
_STACK = 8 * 2**20


def rss_by_mapping() -> dict[str, int]:
    """Resident bytes by kind of mapping (``/proc/self/smaps``): ``file`` (code, libraries),
    ``brk_heap`` (glibc's main arena), ``thread_arenas`` (glibc's other arenas),
    ``thread_stacks`` (8 MiB mappings: threads' stacks, live or cached by glibc), ``stack`` and
    ``other_anon`` (CPython's small-object arenas, large mallocs, gRPC's own mappings:
    adjacent ones are one mapping, so they cannot be told apart here)."""
    out = dict.fromkeys(
        ("file", "brk_heap", "thread_arenas", "thread_stacks", "stack", "other_anon"), 0
    )
    kind = "other_anon"
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=6)
                if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
                    low, high = (int(x, 16) for x in first[0].split("-"))
                    name = first[5].strip() if len(first) > 5 else ""
                    if name == "[heap]":
                        kind = "brk_heap"
                    elif name.startswith("[stack"):
                        kind = "stack"
                    elif name.startswith("["):
                        kind = "file"  # vdso, vvar: tiny
                    elif name:
                        kind = "file"
                    elif low % _GLIBC_HEAP_ALIGN == 0 and high - low < _GLIBC_HEAP_ALIGN:
                        kind = "thread_arenas"
                    elif _STACK - 2**16 <= high - low <= _STACK:
                        kind = "thread_stacks"
                    else:
                        kind = "other_anon"
                elif first[0] == "Rss:":
                    out[kind] += int(first[1]) * 1024
    except OSError:
        return {}
    return out


_OBMALLOC_FIELDS = {
    "# arenas allocated current": "py_arenas",
    "# bytes in allocated blocks": "py_blocks_in_use",
    "# bytes in available blocks": "py_blocks_free",
    "# bytes in unused pools": "py_unused_pools",
}


def obmalloc_stats() -> dict[str, int]:
    """CPython's small-object allocator: arenas mapped (1 MiB each), bytes of blocks in use and
    free in them (``sys._debugmallocstats``, which writes to fd 2: taken from there for the
    moment; a line another thread logs then is lost, which a debug probe can afford)."""
    debug = getattr(sys, "_debugmallocstats", None)
    if debug is None:
        return {}
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                debug()
            finally:
                os.dup2(saved, 2)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
    finally:
        os.close(saved)
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        field = _OBMALLOC_FIELDS.get(name.strip())
        if field:
            out[field] = int(value.strip().replace(",", ""))
    if "py_arenas" in out:
        out["py_arenas"] *= 2**20
    return out


def _owner_name(container: object, skip: set[int]) -> str:
    """``Class.attribute`` (or ``module.name``) of what holds ``container``; ``?`` if unknown."""
    for ref in gc.get_referrers(container):
        if id(ref) in skip:
            continue
        if isinstance(ref, dict):
            attr = None
            for k, v in ref.items():  # no closure over ``container``: a cell would refer to it
                if v is container:
                    attr = k
                    break
            if attr is None:
                continue
            if ref.get("__name__") and isinstance(ref.get("__name__"), str):
                return f"{ref['__name__']}.{attr}"  # a module's globals
            for holder in gc.get_referrers(ref):
                if getattr(holder, "__dict__", None) is ref:
                    return f"{type(holder).__qualname__}.{attr}"
            return f"{{}}.{attr}"
        attrs = getattr(ref, "__dict__", None)  # 3.11 keeps an instance's dict inline
        if isinstance(attrs, dict):
            for k, v in attrs.items():
                if v is container:
                    return f"{type(ref).__qualname__}.{k}"
        slots = getattr(type(ref), "__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if getattr(ref, name, None) is container:
                return f"{type(ref).__qualname__}.{name}"
        if not isinstance(ref, (list, tuple, type(sys._getframe()))):
            return f"{type(ref).__qualname__}.?"
    return "?"


def _largest(objects: list[object]) -> list[tuple[int, object]]:
    """The largest containers, those the collector does not track too: CPython untracks a
    dict holding only strings and numbers (a per-key ``dict[str, int]``), found here as a
    referent of a tracked object."""
    seen: dict[int, object] = {}
    for o in objects:
        if type(o) in _CONTAINERS and len(o) >= MIN_CONTAINER:  # type: ignore[arg-type]
            seen[id(o)] = o
        for r in gc.get_referents(o):
            if type(r) is dict and len(r) >= MIN_CONTAINER and not gc.is_tracked(r):
                seen[id(r)] = r
    sized = [(len(o), o) for o in seen.values()]  # type: ignore[arg-type]
    sized.sort(key=lambda pair: pair[0], reverse=True)
    return sized[:TOP]


def snapshot(trim: bool = False) -> dict[str, Any]:
    """One probe line (see the module's docstring); ``trim``: ``malloc_trim`` first."""
    untrimmed = rss()
    if trim:
        malloc.trim()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__qualname__ for o in objects)
    largest = _largest(objects)
    skip = {id(objects), id(largest)}
    containers = [
        {"owner": _owner_name(o, skip), "type": type(o).__qualname__, "len": n} for n, o in largest
    ]
    del objects, largest
    line: dict[str, Any] = {
        "time": time.time(),
        "rss": rss(),
        **({"rss_untrimmed": untrimmed} if trim else {}),
        **malloc.stats(),
        "rss_by": rss_by_mapping(),
        "threads": threads(),
        **obmalloc_stats(),
        "gc_objects": sum(types.values()),
        "gc_frozen": gc.get_freeze_count(),  # not in gc_objects nor types
        "types": dict(types.most_common(TOP)),
        "containers": containers,
    }
    if tracemalloc.is_tracing():
        line["traced"] = tracemalloc.get_traced_memory()[0]
        line["tracemalloc_overhead"] = tracemalloc.get_tracemalloc_memory()
        stats = tracemalloc.take_snapshot().statistics("lineno")[:TOP]
        line["sites"] = {
            f"{s.traceback[0].filename}:{s.traceback[0].lineno}": s.size for s in stats
        }
    return line


def _run(path: str, every: float, trim: bool) -> None:
    while True:
        try:
            line = json.dumps(snapshot(trim))
            with open(path, "a") as out:
                out.write(line + "\n")
        except Exception as err:  # a probe must never take the process down
            print(f"memdebug: {err!r}", file=sys.stderr)
        time.sleep(every)


def install_from_env() -> bool:
    """Start the probe if ``AMM_MEMDEBUG`` asks for it (call early, before the data comes);
    False when it is off."""
    directory = os.environ.get(ENV)
    if not directory:
        return False
    if os.environ.get(TRACE_ENV, "1") != "0":
        tracemalloc.start(1)
    every = float(os.environ.get(EVERY_ENV, "10"))
    path = os.path.join(directory, f"{os.getpid()}.jsonl")
    threading.Thread(
        target=_run,
        args=(path, every, os.environ.get(TRIM_ENV) == "1"),
        name="memdebug",
        daemon=True,
    ).start()
    return True
