"""The C allocator's settings for an agent process: one glibc arena instead of one per thread.

gRPC receives on its own event-engine threads, and glibc gives each thread an arena of its own
(up to 8 per core). Memory freed there is trimmed back to the kernel, so every message received
lands in fresh pages, and on a virtual machine a page fault with its zeroing costs more than the
copy that caused it. Measured on the project's 2-core VM: a bare gRPC receiver made 0.5 to 1
minor fault per 4 KiB received and spent 1.1 CPU s per GB, with one arena 0.03 to 0.2 faults and
0.75 s; an agent replicating 64 MiB values (``benchmarks/bench_transfer.py``) went from 1.8 to
1.0-1.3 faults per 4 KiB (one is the stored value's own memory) and from 3.0 to 2.5 CPU s per
GB. One arena also keeps the process memory that the agent reports to the AMM closer to what it
holds. An agent has few threads (the event loop, gRPC's, a hashing thread or two), so they
share the arena's lock at no measurable cost.

This is the ``MALLOC_ARENA_MAX=1`` environment variable, applied by the agent itself so that it
holds however the agent is started. Only glibc has ``mallopt``; elsewhere nothing changes. The
calls themselves are ``amm.base.malloc``'s, which the AMM uses too.

``trim`` gives the free memory of the heap back to the system. glibc returns only the free top
of the heap by itself; memory freed below a chunk still in use stays resident. After churn
(values put, copied and forgotten), ``benchmarks/soak.py`` found 12-15 MiB of an agent's 81 MiB
free but resident, back to the system with one ``malloc_trim``.
"""

from __future__ import annotations

from amm.base.malloc import trim, use_one_arena

__all__ = ["trim", "use_one_arena"]
