"""Take the README's dashboard screenshot (docs/dashboard.png) during a replay of the demo trace.

Starts an AMM with its dashboard and 8 agents (1 GiB limit each, as docker-compose.yml's),
replays benchmarks/traces/dot-8000.json.gz on it as ``make demo`` does (the AMM stopped, then
started; the agents restarted in between), then puts keys with a goal of 3 copies (replicas
made) and retires a worker that holds some (events, a worker retiring and gone), and has
headless chromium photograph the page.
Needs chromium (``apt-get install -y chromium``).

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from amm import Client, demo
from amm.cluster import LocalCluster
from amm.replay.command import AGENT_ENV, ReplayOptions, begin_replay, finish_replay, run_modes
from tests.support import browser

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "benchmarks" / "traces" / "dot-8000.json.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--memory-limit", default="1GiB")
    args = parser.parse_args()
    if browser.chromium() is None:
        print("no chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    with LocalCluster(
        args.workers,
        interval="500ms",
        start=False,
        dashboard="127.0.0.1:0",
        agent_args=["--memory-limit", args.memory_limit],
        env=AGENT_ENV,
    ) as cluster:
        options = ReplayOptions(trace=TRACE, byte_scale=demo.BYTE_SCALE, progress=False)
        outcome = begin_replay(options, sys.stdout)
        run_modes(options, outcome, cluster=cluster)
        finish_replay(options, outcome, sys.stdout)
        keys = [f"after-the-replay-{i}" for i in range(40)]
        with Client(cluster.address) as client:
            for i, key in enumerate(keys):
                client.put(key, bytes(4 << 20), cluster.workers[i % 2])
            client.replicate(keys, n=3)
            time.sleep(5)
            client.retire_workers(cluster.workers[0], timeout="60s")
        time.sleep(5)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(f"http://{cluster.dashboard}/", args.out, height=1250)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
