"""What serving Prometheus metrics costs: the same convergence with metrics off and on.

Each run starts a fresh local cluster (an AMM and N agent processes), puts K keys on R workers
with the AMM stopped (``put_many``), starts the AMM and times until it counts one replica per
key, with the CPU seconds the AMM and the agents spent meanwhile. With metrics on, every process
serves ``--metrics-listen`` and a scraper reads all of them every ``--scrape-every`` seconds
(Prometheus's default is 15-60 s) for the whole run. Runs alternate off/on, on/off, ... and the
table gives medians. Then, with the AMM stopped and the keys in place, the cost of one scrape:
the AMM's and an agent's CPU over ``--scrapes`` back-to-back scrapes, divided.

    python benchmarks/bench_metrics.py                       # 10k keys x 4 on 4 agents, 5 runs each
    python benchmarks/bench_metrics.py --keys 100000 --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from amm import AsyncClient, LocalCluster
from amm.tables import render_table

#: Seconds between two checks of the AMM's totals while it converges.
CHECK_EVERY = 0.05
LOOPBACK = "127.0.0.1:0"

Figures = dict[str, Any]


def make_keys(prefix: str, count: int, value_bytes: int) -> dict[str, bytes]:
    filler = b"x" * max(0, value_bytes - 8)
    return {f"{prefix}-{i:07}": i.to_bytes(8, "little") + filler for i in range(count)}


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


@dataclass
class Endpoints:
    """The metrics addresses of the cluster's processes, found as the port each listens on
    besides its gRPC one that answers HTTP."""

    amm: str
    agents: list[str]
    agent_pids: list[int]

    @classmethod
    def of(cls, cluster: LocalCluster) -> Endpoints:
        grpc_ports = {int(a.rsplit(":", 1)[1]) for a in [cluster.address, *cluster.workers]}
        children = [p.pid for p in psutil.Process().children() if p.pid != cluster.service_pid]

        def metrics(pid: int) -> str:
            # An agent also listens on its bulk port: the metrics port is the one that answers.
            for port in sorted(listening_ports(pid) - grpc_ports):
                with contextlib.suppress(OSError):
                    scrape(f"127.0.0.1:{port}")
                    return f"127.0.0.1:{port}"
            return ""

        return cls(metrics(cluster.service_pid), [metrics(p) for p in children], children)


def scrape(address: str) -> int:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return len(response.read())


@dataclass
class Scraper:
    """Scrapes every address every ``every`` seconds from a thread, as Prometheus would."""

    addresses: list[str]
    every: float
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(self.every):
            for address in self.addresses:
                started = time.perf_counter()
                try:
                    scrape(address)
                except OSError:
                    self.failures += 1
                    continue
                self.latencies.append(time.perf_counter() - started)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self.run, name="scraper", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(30)


async def converge(cluster: LocalCluster, args: argparse.Namespace, pids: list[int]) -> Figures:
    """Put the keys, start the AMM, time until it counts one replica per key."""
    figures: Figures = {}
    data = make_keys("key", args.keys, args.value_bytes)
    async with AsyncClient(cluster.address, timeout=max(60.0, args.timeout)) as client:
        targets = list(await client.has_what())[: args.replicas]
        await client.put_many(data, workers=targets)
        await client.who_has([next(iter(data))], fresh=True)
        amm_cpu, agents_cpu = cpu_seconds([cluster.service_pid]), cpu_seconds(pids)
        started = time.perf_counter()
        await client.amm.start()
        converged = None
        while time.perf_counter() - started < args.timeout:
            await asyncio.sleep(CHECK_EVERY)
            totals = (await client.status()).totals
            if totals.keys == args.keys and totals.replicas == args.keys:
                converged = time.perf_counter() - started
                break
        figures["converge_s"] = converged
        figures["amm_cpu_s"] = cpu_seconds([cluster.service_pid]) - amm_cpu
        figures["agents_cpu_s"] = cpu_seconds(pids) - agents_cpu
        await client.amm.stop()
    return figures


def per_scrape(address: str, pid: int, n: int) -> float:
    """CPU seconds ``pid`` spends per scrape of ``address``, over ``n`` scrapes in a row."""
    before = cpu_seconds([pid])
    for _ in range(n):
        scrape(address)
    return (cpu_seconds([pid]) - before) / n


def one_run(args: argparse.Namespace, metrics: bool) -> Figures:
    extra = ["--metrics-listen", LOOPBACK] if metrics else []
    with LocalCluster(
        args.workers,
        interval=args.interval,
        start=False,
        service_args=extra,
        agent_args=extra,
        timeout=60,
    ) as cluster:
        endpoints = Endpoints.of(cluster)
        if not metrics:
            return asyncio.run(converge(cluster, args, endpoints.agent_pids))
        scraper = Scraper([endpoints.amm, *endpoints.agents], args.scrape_every)
        with scraper.running():
            figures = asyncio.run(converge(cluster, args, endpoints.agent_pids))
        figures["scrapes"] = len(scraper.latencies)
        figures["scrape_failures"] = scraper.failures
        figures["scrape_p50_ms"] = statistics.median(scraper.latencies) * 1e3
        figures["scrape_max_ms"] = max(scraper.latencies) * 1e3
        figures["amm_cpu_per_scrape_ms"] = (
            per_scrape(endpoints.amm, cluster.service_pid, args.scrapes) * 1e3
        )
        figures["agent_cpu_per_scrape_ms"] = (
            per_scrape(endpoints.agents[0], endpoints.agent_pids[0], args.scrapes) * 1e3
        )
        figures["amm_scrape_bytes"] = scrape(endpoints.amm)
        return figures


def median(runs: list[Figures], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def render(off: list[Figures], on: list[Figures]) -> str:
    rows: list[list[str]] = []
    for key, label, unit in (
        ("converge_s", "converge: until 1 replica per key", "s"),
        ("amm_cpu_s", "  AMM CPU meanwhile", "s"),
        ("agents_cpu_s", "  agents' CPU meanwhile", "s"),
    ):
        a, b = median(off, key), median(on, key)
        ratio = f"{b / a:.3f}" if a and b is not None else "-"
        rows.append([label, _cell(a, unit), _cell(b, unit), ratio])
    for key, label, unit in (
        ("scrapes", "  scrapes while converging (all processes)", "n"),
        ("scrape_p50_ms", "  scrape latency p50", "ms"),
        ("scrape_max_ms", "  scrape latency max", "ms"),
        ("amm_cpu_per_scrape_ms", "AMM CPU per scrape, K keys held", "ms"),
        ("agent_cpu_per_scrape_ms", "agent CPU per scrape", "ms"),
        ("amm_scrape_bytes", "AMM scrape size", "b"),
    ):
        rows.append([label, "-", _cell(median(on, key), unit), ""])
    return render_table(["", "metrics off", "metrics on", "on/off"], rows, right=range(1, 4))


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "b":
        return f"{value / 1024:.1f} KiB"
    return f"{value:g}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000, help="keys put (10000)")
    parser.add_argument("--replicas", type=int, default=4, help="replicas put of each key (4)")
    parser.add_argument("--workers", type=int, default=4, help="agent processes (4)")
    parser.add_argument("--value-bytes", type=int, default=100, help="size of each value (100)")
    parser.add_argument("--interval", type=float, default=0.5, help="the AMM's interval, s")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each mode (5)")
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds (1)")
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes timed for the cost of one")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of a run, s")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if not 1 <= args.replicas <= args.workers:
        parser.error("--replicas must be between 1 and --workers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    print(
        f"{args.keys:,} keys x {args.replicas} on {args.workers} agents, interval "
        f"{args.interval:g} s, scraped every {args.scrape_every:g} s; {args.repeat} runs each; "
        f"load average {' '.join(f'{x:.2f}' for x in load_start)}",
        flush=True,
    )
    runs: dict[bool, list[Figures]] = {False: [], True: []}
    for i in range(args.repeat):
        for metrics in (False, True) if i % 2 == 0 else (True, False):
            figures = one_run(args, metrics)
            runs[metrics].append(figures)
            converged = figures.get("converge_s")
            print(
                f"  run {i + 1} metrics {'on ' if metrics else 'off'}: converged in "
                f"{'-' if converged is None else f'{converged:.3f} s'}, AMM CPU "
                f"{figures['amm_cpu_s']:.2f} s, agents' CPU {figures['agents_cpu_s']:.2f} s",
                flush=True,
            )
    load_end = os.getloadavg()
    print()
    print(render(runs[False], runs[True]))
    print(
        f"load average at start {' '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in load_end)}"
    )
    if args.json is not None:
        document = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "load_average": {"start": load_start, "end": load_end},
            "off": runs[False],
            "on": runs[True],
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
