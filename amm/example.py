"""``python -m amm.example``: the README's Dask-style example against a real local cluster.

Starts an AMM (on 127.0.0.1:50051 when that port is free) and four agents, then runs the example
of the README step by step, printed as a REPL session would read: a replica appears when a worker
reads a key it lacks, and disappears within a few intervals once the AMM runs. Each step checks
its result, so the example doubles as a smoke test: any surprise ends it with exit code 1 and a
message saying which step went wrong.
"""

from __future__ import annotations

import pprint
import socket
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from amm.client import Client
from amm.cluster import ClusterError, LocalCluster
from amm.errors import AmmError
from amm.tables import render_status, render_workers, summarize_cycle

T = TypeVar("T")
PREFERRED = ("127.0.0.1", 50051)
INTERVAL = 0.5
WORKERS = 4


class ExampleFailed(Exception):
    """A step of the example did not give the expected result."""


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def step(source: str, call: Callable[[], T], assign: bool = False) -> T:
    """Print ``>>> source``, run ``call`` and print its result as the REPL would.

    ``assign``: the source is an assignment, so the REPL prints nothing.
    """
    print(f">>> {source}", flush=True)
    result = call()
    if result is not None and not assign:
        print(pprint.pformat(result, width=80, sort_dicts=False), flush=True)
    return result


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise ExampleFailed(what)


def wait_for_single_replica(client: Client, key: str, timeout: float) -> tuple[str, ...]:
    """Poll ``who_has`` until ``key`` has one holder; the AMM's ReduceReplicas at work."""
    deadline = time.monotonic() + timeout
    while True:
        holders = client.who_has(key)[key]
        if len(holders) == 1:
            return holders
        if time.monotonic() > deadline:
            refusals = [
                f"{r.op} {r.key!r} on {r.worker}: {r.reason} ({r.message})"
                for r in client.status().recent_refusals[:3]
            ]
            raise ExampleFailed(
                f"{key!r} still has {len(holders)} replicas after {timeout:.0f} s; "
                f"recent refusals: {'; '.join(refusals) or 'none'}"
            )
        time.sleep(INTERVAL / 5)


def run_example(client: Client) -> None:
    print(">>> from amm import Client")
    print(f'>>> client = Client("{client.address}")')
    w1, w2, w3, w4 = step("w1, w2, w3, w4 = client.has_what()", client.has_what, assign=True)
    step('client.put("x", b"payload", workers=[w1])', lambda: client.put("x", b"payload", [w1]))
    has_what = step("client.has_what()", client.has_what)
    expect(has_what == {w1: ("x",), w2: (), w3: (), w4: ()}, f"x should be on {w1} only")
    value = step('client.get("x", worker=w2)', lambda: client.get("x", worker=w2))
    expect(value == b"payload", "get returned another value")
    has_what = step("client.has_what()", client.has_what)
    expect(has_what[w2] == ("x",), f"{w2} should keep a replica of x after reading it")

    print("\n# Now let the AMM run: ReduceReplicas drops the duplicate within a few intervals.")
    running = step(
        "client.amm.start(); client.amm.running()",
        lambda: (client.amm.start(), client.amm.running())[1],
    )
    expect(running is True, "the AMM should be running after start()")
    started = time.monotonic()
    holders = wait_for_single_replica(client, "x", timeout=max(10.0, 20 * INTERVAL))
    print(f"# ... {time.monotonic() - started:.1f} s later:")
    step('client.who_has("x")', lambda: client.who_has("x"))
    expect(holders[0] in (w1, w2), "x moved to a worker that never had it")

    running = step(
        "client.amm.stop(); client.amm.running()",
        lambda: (client.amm.stop(), client.amm.running())[1],
    )
    expect(running is False, "the AMM should be stopped after stop()")
    report = step(
        "client.amm.run_once()  # one cycle on demand, even while stopped", client.amm.run_once
    )
    expect(report.directives_sent == 0, "nothing should be left to do")
    print(f"# {summarize_cycle(report)}")

    print("\n>>> print(render_status(client.address, client.status()))")
    print(render_status(client.address, client.status()))
    print("\n>>> print(render_workers(client.workers(fresh=True)))")
    print(render_workers(client.workers(fresh=True)))


def main(listen: str | None = None) -> int:
    """Run the example; the AMM listens on ``listen``, by default 127.0.0.1:50051 if free."""
    if listen is None:
        host, port = PREFERRED
        listen = f"{host}:{port}" if port_free(host, port) else f"{host}:0"
    started = time.monotonic()
    print(f"# Starting an AMM on {listen} and {WORKERS} agents (interval {INTERVAL * 1000:.0f}ms)")
    try:
        with LocalCluster(WORKERS, listen=listen, interval=INTERVAL, start=False) as cluster:
            print(f"# AMM at {cluster.address}; workers {', '.join(cluster.workers)}\n")
            with Client(cluster.address, timeout=10) as client:
                run_example(client)
    except ExampleFailed as err:
        print(f"\nexample failed: {err}", file=sys.stderr)
        return 1
    except AmmError as err:
        print(f"\nexample failed: {err.status.name}: {err.message}", file=sys.stderr)
        return 1
    except ClusterError as err:
        print(f"\nexample failed: could not start the cluster: {err}", file=sys.stderr)
        return 1
    print(f"\n# Cluster stopped; the example took {time.monotonic() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
