"""What an agent's CPU pays per drop: the agents' share of a converging cycle.

Real agents (``worker_agent.agent.Agent``, standalone, on loopback gRPC) each holding ``--keys``
keys. The script plays the AMM: it sends DROP directives naming the keeper, ``--per-message`` per
Directives message (built and serialized before the clock starts), reads every outcome, then
polls the agents' changes in pages of ``--poll-keys`` (as a cycle does; with ``--poll-every``
also while they drop) and asks ``HoldsKeys`` of 10,000 keys. It prints the CPU seconds of each
phase per 100,000 drops, and with ``--profile N`` the N functions that cost most (cProfile,
which inflates every figure: for the shares, not the totals).

Shapes: ``--agents 2`` (the default), one dropper and one keeper: every key dropped once.
``--agents 4``, the cluster's: every agent holds every key, key ``i`` is kept by agent
``i % 4`` and dropped by the three others naming it, so each agent drops and keeps at once and
asks three keepers per batch. The agents run in this process (the CPU counted is this
process's, the script's few client calls included) or, with ``--processes``, each in its own
``python -m worker_agent`` (their CPU counted, not the script's): the cluster's shape, as
``bench_cluster.py`` measures it, without the AMM. The AMM sends a 100k-key cycle's drops in
messages of ~500 directives (``--per-message 512``).

    python benchmarks/bench_agent_drops.py                        # 100,000 keys, 5,000 per message
    python benchmarks/bench_agent_drops.py --repeat 3 --json drops.json
    python benchmarks/bench_agent_drops.py --keys 20000 --profile 30
    python benchmarks/bench_agent_drops.py --agents 4 --per-message 512 --poll-every 0.5 --processes
    python benchmarks/bench_agent_drops.py --columns ...          # drops in columns (drop-columns)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig

#: Keys per PutMany message.
PUT_PER_MESSAGE = 10_000
#: Keys per HoldsKeys call (the agent's limit).
HOLDS_KEYS = 10_000
#: Longest wait for the outcomes of one run, in seconds.
DEADLINE = 600.0


def _put_messages(keys: list[str], data: bytes) -> Iterator[agent_pb2.PutManyRequest]:
    for start in range(0, len(keys), PUT_PER_MESSAGE):
        chunk = keys[start : start + PUT_PER_MESSAGE]
        yield agent_pb2.PutManyRequest(items=[agent_pb2.PutItem(key=k, data=data) for k in chunk])


def _drop_messages(
    keys: list[str],
    keepers: list[str],
    size: int,
    digest: str,
    per_message: int,
    columns: bool = False,
) -> list[bytes]:
    """Directives messages of ``per_message`` DROPs of ``keys``, key ``keys[i]`` naming
    ``keepers[i]`` (built and serialized before the clock starts); with ``columns``, the drops
    in columns (``DirectivesRequest.drops``, feature "drop-columns") instead of ``batch``."""
    if columns:
        return [
            _drop_columns(
                keys[start : start + per_message],
                keepers[start : start + per_message],
                size,
                digest,
            ).SerializeToString()
            for start in range(0, len(keys), per_message)
        ]
    return [
        agent_pb2.DirectivesRequest(
            batch=[
                types_pb2.Directive(
                    id=f"drop-{key}",
                    epoch=1,
                    op=types_pb2.DIRECTIVE_OP_DROP,
                    key=key,
                    size=size,
                    checksum=digest,
                    holders=[keeper],
                    policy="reduce-replicas",
                )
                for key, keeper in zip(
                    keys[start : start + per_message],
                    keepers[start : start + per_message],
                    strict=True,
                )
            ]
        ).SerializeToString()
        for start in range(0, len(keys), per_message)
    ]


def _drop_columns(
    keys: list[str], keepers: list[str], size: int, digest: str
) -> agent_pb2.DirectivesRequest:
    table = list(dict.fromkeys(keepers))
    index = {keeper: n for n, keeper in enumerate(table)}
    return agent_pb2.DirectivesRequest(
        drops=agent_pb2.DropColumns(
            epoch=1,
            ids=[f"drop-{key}" for key in keys],
            keys=keys,
            sizes=[size] * len(keys),
            checksums=[digest] * len(keys),
            keepers=[agent_pb2.Keepers(holders=[keeper]) for keeper in table],
            keepers_index=[index[keeper] for keeper in keepers],
            policy="reduce-replicas",
            reasons=[""],
            reason_index=[0] * len(keys),
        )
    )


async def _send_drops(channel: grpc.aio.Channel, messages: list[bytes], count: int) -> int:
    """Send ``messages`` on one Directives stream, read ``count`` outcomes; how many applied."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message
        await done.wait()  # the stream stays open until every outcome is in

    directives = channel.stream_stream(
        "/amm.v1.WorkerAgent/Directives",
        request_serializer=None,
        response_deserializer=agent_pb2.DirectivesResponse.FromString,
    )
    applied = answered = 0
    call = directives(requests())
    async with asyncio.timeout(DEADLINE):
        async for response in call:
            for outcome in response.batch:
                answered += 1
                applied += outcome.status == types_pb2.OUTCOME_STATUS_APPLIED
            answered += len(response.applied.ids)
            applied += len(response.applied.ids)
            if answered >= count:
                break
    done.set()
    call.cancel()
    return applied


async def _poll_all(
    stub: agent_pb2_grpc.WorkerAgentAsyncStub, since: int, incarnation: str, max_keys: int
) -> tuple[int, int, int]:
    """Every change of an agent since ``since``, in pages: (version, pages, removed)."""
    version, pages, removed = since, 0, 0
    while True:
        answer = await stub.Poll(
            agent_pb2.PollRequest(since_version=version, incarnation=incarnation, max_keys=max_keys)
        )
        pages += 1
        removed += len(answer.removed)
        version = answer.version
        if not answer.more:
            return version, pages, removed


def _cpu(processes: list[psutil.Process]) -> float:
    """CPU seconds so far: of the agents' processes, or of this one when they run in it."""
    if not processes:
        return time.process_time()
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_processes(
    stack: contextlib.AsyncExitStack, count: int
) -> tuple[list[str], list[psutil.Process]]:
    """``count`` standalone agents, each in its own process (``python -m worker_agent``), as in
    a cluster: their addresses and processes (stopped when ``stack`` closes)."""
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(count)]
    processes = []
    for address in addresses:
        popen = subprocess.Popen(
            [sys.executable, "-m", "worker_agent", "--listen", address, "--insecure"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(popen.wait, 30)
        stack.callback(popen.terminate)
        processes.append(psutil.Process(popen.pid))
    return addresses, processes


async def one_run(args: argparse.Namespace, profile: cProfile.Profile | None) -> dict[str, Any]:
    """Every key dropped down to one copy: CPU seconds by phase.

    ``--agents 2`` (the default): one dropper, one keeper. More: the cluster's shape, every
    agent holding every key and key ``i`` kept by agent ``i % agents``, the others dropping it
    naming that keeper (each agent a dropper and a keeper, each dropper asking every other)."""
    data = b"x" * args.value_bytes
    digest = checksum(data)
    keys = [f"key-{i:07d}" for i in range(args.keys)]
    config = AgentConfig(amm=None, listen="127.0.0.1:0")
    count = args.agents
    async with contextlib.AsyncExitStack() as stack:
        if args.processes:
            addresses, processes = _start_processes(stack, count)
        else:
            agents = [await stack.enter_async_context(Agent(config)) for _ in range(count)]
            addresses, processes = [agent.address for agent in agents], []
        channels = [
            await stack.enter_async_context(
                grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            )
            for address in addresses
        ]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        stubs = [agent_pb2_grpc.WorkerAgentStub(channel) for channel in channels]
        for stub in stubs:
            await stub.PutMany(_put_messages(keys, data))
        starts = []
        for stub in stubs:
            first = await stub.Poll(agent_pb2.PollRequest(max_keys=1))
            starts.append((first.version, first.incarnation))
        if count == 2:  # the first drops every key, the second keeps them
            plan = [(keys, [addresses[1]] * len(keys)), ([], [])]
        else:
            plan = []
            for me in range(count):
                mine = [i for i in range(len(keys)) if i % count != me]
                plan.append(([keys[i] for i in mine], [addresses[i % count] for i in mine]))
        messages = [
            _drop_messages(dropped, keepers, len(data), digest, args.per_message, args.columns)
            for dropped, keepers in plan
        ]
        drops = sum(len(dropped) for dropped, _ in plan)
        versions = [start for start, _ in starts]
        polled = [0, 0]
        stop_polls = asyncio.Event()

        async def poll_meanwhile() -> None:
            """The AMM's cycle: every ``--poll-every`` s, every agent's changes since the last."""
            while not stop_polls.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_polls.wait(), args.poll_every)
                for n, stub in enumerate(stubs):
                    versions[n], pages, removed = await _poll_all(
                        stub, versions[n], starts[n][1], args.poll_keys
                    )
                    polled[0] += pages
                    polled[1] += removed

        if profile is not None:
            profile.enable()
        cpu0, wall0 = _cpu(processes), time.perf_counter()
        poller = asyncio.create_task(poll_meanwhile()) if args.poll_every > 0 else None
        applied = sum(
            await asyncio.gather(
                *(
                    _send_drops(channel, batch, len(dropped))
                    for channel, batch, (dropped, _) in zip(channels, messages, plan, strict=True)
                    if batch
                )
            )
        )
        cpu1, wall1 = _cpu(processes), time.perf_counter()
        stop_polls.set()
        if poller is not None:
            await poller
        for n, stub in enumerate(stubs):
            versions[n], pages, removed = await _poll_all(
                stub, versions[n], starts[n][1], args.poll_keys
            )
            polled[0] += pages
            polled[1] += removed
        cpu2 = _cpu(processes)
        for start_ in range(0, len(keys), HOLDS_KEYS):
            await stubs[-1].HoldsKeys(
                agent_pb2.HoldsKeysRequest(keys=keys[start_ : start_ + HOLDS_KEYS])
            )
        cpu3 = _cpu(processes)
        if profile is not None:
            profile.disable()
    per = 100_000 / drops
    return {
        "applied": applied,
        "not_applied": drops - applied,
        "drops_wall_s": wall1 - wall0,
        "drops_cpu_s": cpu1 - cpu0,
        "drops_cpu_per_100k_s": (cpu1 - cpu0) * per,
        "poll_pages": polled[0],
        "poll_removed": polled[1],
        "poll_cpu_per_100k_s": (cpu2 - cpu1) * per,
        "holds_keys_cpu_per_100k_s": (cpu3 - cpu2) * 100_000 / len(keys),
    }


def _profile_table(profile: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=5_000)
    parser.add_argument(
        "--agents", type=int, default=2, help="2: a dropper and a keeper; more: the cluster's shape"
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="each agent in its own process (their CPU counted, not this one's)",
    )
    parser.add_argument(
        "--poll-every", type=float, default=0.0, help="s between polls during the drops (0: none)"
    )
    parser.add_argument("--poll-keys", type=int, default=4_000, help="keys per poll page")
    parser.add_argument(
        "--columns",
        action="store_true",
        help="send the drops in columns (DirectivesRequest.drops, feature drop-columns)",
    )
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the table gives medians")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="top N by cProfile")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    runs = []
    for _ in range(args.repeat):
        profile = cProfile.Profile() if args.profile else None
        runs.append(asyncio.run(one_run(args, profile)))
        if profile is not None:
            print(_profile_table(profile, args.profile))
    load_end = os.getloadavg()
    medians = {
        name: statistics.median(run[name] for run in runs)
        for name in runs[0]
        if isinstance(runs[0][name], float)
    }
    shape = (
        "one dropper and one keeper"
        if args.agents == 2
        else f"{args.agents} agents each dropping every key another keeps"
    )
    polls = f"every {args.poll_every:g} s" if args.poll_every > 0 else "after"
    print(
        f"{args.keys:,} keys, {args.per_message:,} drops per message, {shape} "
        f"{'each in its own process' if args.processes else 'in this process'}, "
        f"polls {polls}, drops {'in columns' if args.columns else 'as Directive messages'}; "
        f"{args.repeat} runs (median, then each)"
    )
    rows = (
        ("drops, wall s", "drops_wall_s"),
        ("drops, CPU s per 100k", "drops_cpu_per_100k_s"),
        ("poll pages, CPU s per 100k", "poll_cpu_per_100k_s"),
        ("HoldsKeys, CPU s per 100k", "holds_keys_cpu_per_100k_s"),
    )
    for label, name in rows:
        each = " ".join(f"{run[name]:.2f}" for run in runs)
        print(f"  {label:<28} {medians[name]:6.2f}   ({each})")
    print(
        "  applied / not applied        "
        + " ".join(f"{r['applied']:,}/{r['not_applied']:,}" for r in runs)
    )
    print(
        "load average at start "
        + " ".join(f"{x:.2f}" for x in load_start)
        + ", at end "
        + " ".join(f"{x:.2f}" for x in load_end)
    )
    if args.json is not None:
        document: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
        document |= {"load_average": {"start": load_start, "end": load_end}}
        document |= {"median": medians, "runs": runs}
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
