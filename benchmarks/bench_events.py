"""How fast the AMM's events reach their watchers, and what a stuck watcher costs.

An AMM runs in this process (plaintext, 127.0.0.1:0, stopped); W clients follow ``WatchEvents``
over loopback gRPC while the AMM records E events at a given rate (or as fast as it can). For each
watcher count it reports the latency from recording an event to its arrival at each watcher
(median, p99, max), and the events delivered and reported missed. One more watcher opens the
stream and reads nothing: the most the AMM's feed queues for it stays within the per-watcher
bound (1,000) however many events come (gRPC's flow-control windows take some first: a small
count shows 0).

    python benchmarks/bench_events.py                      # 1, 8, 32 watchers x 2,000 events, 200/s
    python benchmarks/bench_events.py --rate 0             # a burst: watchers fall behind, gaps
    python benchmarks/bench_events.py --watchers 1 64 --events 5000 --json events.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from amm import AsyncClient
from amm.models import Event, EventGap
from amm.tables import render_table
from amm_service.api.server import AmmServer
from amm_service.config import load_config

BURST = 50
"""Events recorded back to back, then the loop is let go (as a cycle records them)."""


async def _follow(
    client: AsyncClient, after: int, count: int, arrived: dict[int, float], missed: list[int]
) -> None:
    async for item in client.events(after=after, follow=True):
        if isinstance(item, EventGap):
            missed.append(item.missed)
            continue
        assert isinstance(item, Event)
        arrived[item.seq] = time.perf_counter()
        if item.seq >= after + count:
            return


async def measure(watchers: int, events: int, rate: float, state: Path) -> dict[str, Any]:
    config = load_config(
        env={}, overrides={"listen": "127.0.0.1:0", "state_path": str(state), "interval": "1h"}
    )
    async with AmmServer(config) as amm:
        assert amm.manager is not None
        log = amm.manager.events
        feed = amm.manager.event_feed
        clients = [AsyncClient(amm.address) for _ in range(watchers + 1)]
        try:
            start = log.last_seq
            arrivals: list[dict[int, float]] = [{} for _ in range(watchers)]
            missed: list[list[int]] = [[] for _ in range(watchers)]
            tasks = [
                asyncio.create_task(_follow(c, start, events, a, m))
                for c, a, m in zip(clients, arrivals, missed, strict=False)
            ]
            # A watcher that opens the stream and never reads.
            stuck = clients[-1].events(after=start, follow=True)
            stuck_first = asyncio.create_task(anext(stuck))
            # The streams open in the server's own time; nothing to await but the count.
            while feed.watchers < watchers + 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            recorded: dict[int, float] = {}
            began = time.perf_counter()
            for i in range(events):
                event = log.record("bench", f"event {i}")
                recorded[event.seq] = time.perf_counter()
                if rate > 0:
                    await asyncio.sleep(max(0.0, began + (i + 1) / rate - time.perf_counter()))
                elif i % BURST == BURST - 1:
                    await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
            elapsed = time.perf_counter() - began
            queued = max(s.queued for s in feed._watchers)
            stuck_first.cancel()
            await stuck.aclose()
        finally:
            for client in clients:
                await client.close()
    latencies = sorted(
        (a[seq] - recorded[seq]) * 1e3 for a in arrivals for seq in a if seq in recorded
    )
    return {
        "watchers": watchers,
        "events": events,
        "rate": rate,
        "delivered": sum(len(a) for a in arrivals),
        "missed": sum(sum(m) for m in missed),
        "median_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "max_ms": latencies[-1],
        "deliveries_per_s": sum(len(a) for a in arrivals) / elapsed,
        "most_queued_for_one_watcher": queued,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for i, watchers in enumerate(args.watchers):
            state = Path(folder) / f"amm-{i}.db"
            results.append(await measure(watchers, args.events, args.rate, state))
    return results


def main() -> None:
    logging.getLogger("amm_service").setLevel(logging.ERROR)  # its hour-long interval warns
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="events recorded per second (%(default)s); 0: as fast as possible, in bursts of "
        f"{BURST}, which outruns the watchers and shows the bound and the gaps",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures here too")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    headers = (
        "WATCHERS",
        "EVENTS",
        "DELIVERED",
        "MISSED",
        "MEDIAN",
        "P99",
        "MAX",
        "DELIVERIES/S",
        "STUCK WATCHER QUEUE",
    )
    rows = [
        (
            r["watchers"],
            r["events"],
            r["delivered"],
            r["missed"],
            f"{r['median_ms']:.2f} ms",
            f"{r['p99_ms']:.2f} ms",
            f"{r['max_ms']:.2f} ms",
            f"{r['deliveries_per_s']:,.0f}",
            r["most_queued_for_one_watcher"],
        )
        for r in results
    ]
    print(render_table(headers, rows, right=range(len(headers))))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
