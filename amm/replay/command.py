"""``amm replay TRACE``: replay a recorded trace with the AMM off, on, or both, and report.

Without ``--address`` each run gets a fresh ``LocalCluster`` of N agent processes (so the second
run does not inherit the first one's process memory); with ``--address`` both runs use the
running AMM there and its registered agents, turning the AMM off or on with Stop/Start and
restoring its previous state afterwards. ``python -m amm.demo`` runs both on one local cluster
of its own, with the dashboard on (``run_modes`` with ``cluster``). Cluster-wide memory is
sampled from the AMM with ``amm.diagnostics.MemorySampler`` (managed and process) while each run
lasts; a progress bar on stderr shows the replay advancing, the table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from amm.base.security import Security
from amm.base.units import format_bytes
from amm.client import AsyncClient
from amm.cluster import LocalCluster
from amm.diagnostics import MemorySampler
from amm.errors import AmmError
from amm.replay.plan import ReplayPlan, Scale, make_plan
from amm.replay.report import (
    HONESTY_NOTE,
    DaskFigures,
    RunFigures,
    dask_figures,
    render_report,
    report_document,
)
from amm.replay.runner import Replayer, ReplayError, ReplayStats, forget_prefix
from amm.replay.trace import Trace, load_trace

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

MODES: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}
AGENT_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536"}
"""What Dask's nanny sets for its workers (``distributed.nanny.pre-spawn-environ``): glibc hands
freed memory back to the system, so process memory follows what agents hold, as in Dask."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """The command's flags; ``interval`` is the local AMM's cycle interval."""

    trace: Path
    workers: int | None = None
    modes: tuple[bool, ...] = (False, True)
    time_scale: float = 1.0
    byte_scale: float = 1.0
    address: str | None = None
    plot: Path | None = None
    json: Path | None = None
    interval: float = 0.5
    progress: bool = True
    sample_interval: float = 0.5


@dataclass
class ReplayOutcome:
    """Everything a replay produced: the figures, the samplers, the text of the report."""

    trace: Trace
    plan: ReplayPlan
    runs: list[RunFigures] = field(default_factory=list)
    managed: MemorySampler = field(default_factory=MemorySampler)
    process: MemorySampler = field(default_factory=MemorySampler)
    dask: DaskFigures | None = None
    report: str = ""
    amm_interval: float | None = None
    shared: str = ""
    """What the report says of runs that shared their agents; empty when each had its own."""

    @property
    def ok(self) -> bool:
        return all(run.check_ok for run in self.runs)


def _label(amm: bool) -> str:
    return "AMM on" if amm else "AMM off"


class _Bar:
    """The progress bar of one run: steps done, and the cluster's managed memory right now."""

    def __init__(self, console: Console | None, label: str, total: int, sampler: MemorySampler):
        self._sampler = sampler
        self._label = label
        self._progress: Progress | None = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tasks"),
                TimeElapsedColumn(),
                TextColumn("managed {task.fields[memory]}"),
                console=console,
            )
            self._task = self._progress.add_task(f"replay, {label}", total=total, memory="-")

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, *_: object) -> None:
        if self._progress is None:
            return
        samples = self._sampler.samples.get(self._label) or [(0.0, 0)]
        self._progress.update(self._task, advance=1, memory=format_bytes(samples[-1][1]))


async def _agents(client: AsyncClient, wanted: int | None) -> list[str]:
    running = [w.address for w in await client.workers(fresh=True) if w.status == "running"]
    if not running:
        raise ReplayError(f"the AMM at {client.address} has no running agent registered")
    if wanted is not None:
        if wanted > len(running):
            raise ReplayError(
                f"--workers {wanted}: the AMM at {client.address} has {len(running)} running agents"
            )
        running = running[:wanted]
    return running


async def _run_once(
    address: str,
    agents: list[str] | None,
    amm: bool,
    options: ReplayOptions,
    outcome: ReplayOutcome,
    console: Console | None,
) -> RunFigures:
    """One run against the AMM at ``address``; ``agents`` None: its registered agents."""
    label = _label(amm)
    # A running AMM (--address) is reached as every CLI verb reaches it: AMM_TLS decides.
    security = Security.from_env() if options.address is not None else None
    async with AsyncClient(address, security=security) as client:
        if agents is None:
            agents = await _agents(client, options.workers)
        status = await client.status()
        outcome.amm_interval = status.interval
        plan = make_plan(
            outcome.trace,
            len(agents),
            Scale(options.time_scale, options.byte_scale),
            f"replay-{uuid.uuid4().hex[:8]}-{'on' if amm else 'off'}",
        )
        outcome.plan = plan
        try:
            await (client.amm.start() if amm else client.amm.stop())
            with _Bar(console, label, len(plan.steps), outcome.managed) as bar:
                interval = options.sample_interval
                async with (
                    outcome.managed.sample(
                        label, client=client, measure="managed", interval=interval
                    ),
                    outcome.process.sample(
                        label, client=client, measure="process", interval=interval
                    ),
                ):
                    stats = await Replayer(client, plan, agents, on_step=bar.advance).run()
        except BaseException:  # Ctrl-C included
            if options.address is not None:
                # A shared cluster: leave none of our keys behind (pinned ones stay; say so).
                try:
                    await forget_prefix(client, plan.prefix)
                except (AmmError, ReplayError) as err:
                    print(f"warning: keys under {plan.prefix}/ may be left: {err}", file=sys.stderr)
            raise
        finally:
            if options.address is not None:
                await (client.amm.start() if status.running else client.amm.stop())
    return _figures(label, amm, stats, outcome)


def _figures(label: str, amm: bool, stats: ReplayStats, outcome: ReplayOutcome) -> RunFigures:
    managed = outcome.managed.samples[label]
    process = outcome.process.samples[label]
    return RunFigures(
        label=label,
        amm=amm,
        wall_seconds=stats.wall_seconds,
        peak_managed=max(v for _, v in managed),
        peak_process=max(v for _, v in process),
        start_process=process[0][1],
        bytes_transferred=stats.bytes_transferred,
        bytes_put=stats.bytes_put,
        replicas_dropped=stats.replicas_dropped,
        max_lag=stats.max_lag,
        check=stats.check.describe(),
        check_ok=stats.check.ok,
    )


def _run_mode(
    amm: bool,
    options: ReplayOptions,
    outcome: ReplayOutcome,
    console: Console | None,
    cluster: LocalCluster | None,
) -> RunFigures:
    if cluster is not None:
        return asyncio.run(
            _run_once(cluster.address, cluster.workers, amm, options, outcome, console)
        )
    if options.address is not None:
        return asyncio.run(_run_once(options.address, None, amm, options, outcome, console))
    with local_cluster(options, outcome.trace) as fresh:
        return asyncio.run(_run_once(fresh.address, fresh.workers, amm, options, outcome, console))


def local_cluster(
    options: ReplayOptions, trace: Trace, *, dashboard: str | None = None
) -> LocalCluster:
    """The local cluster a replay runs on: one agent per recorded worker (or ``--workers``),
    the AMM stopped, cycling every ``--interval`` once started."""
    workers = options.workers or len(trace.workers)
    return LocalCluster(
        workers, interval=options.interval, start=False, env=AGENT_ENV, dashboard=dashboard
    )


#: Seconds to wait, at most, for the agents to settle between two runs on the same agents.
SETTLE_SECONDS = 15.0
#: Process memory that moves by less than this between two looks has settled.
SETTLED_PROCESS = 0.01


async def _settle(address: str, security: Security | None) -> None:
    """Between two runs on the same agents: wait until what the first left has gone (its keys
    are forgotten as it ends) and process memory has stopped falling (glibc hands freed memory
    back, ``AGENT_ENV``), so that the next run starts as a fresh one would, within
    ``SETTLE_SECONDS``."""
    async with AsyncClient(address, security=security) as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_SECONDS
        before = (-1, -1)  # (managed, process) at the previous look
        while loop.time() < deadline:
            workers = await client.workers(fresh=True)
            now = (sum(w.managed_bytes for w in workers), sum(w.process_bytes for w in workers))
            moved = abs(now[1] - before[1])
            if now[0] == before[0] and moved <= SETTLED_PROCESS * max(before[1], 1):
                return
            before = now
            await asyncio.sleep(0.5)


def samples_document(outcome: ReplayOutcome) -> dict[str, Any]:
    """Each run's samples as seconds since its first sample, for ``--json``."""
    document: dict[str, Any] = {}
    for measure, sampler in (("managed", outcome.managed), ("process", outcome.process)):
        for label, samples in sampler.samples.items():
            t0 = samples[0][0] if samples else 0.0
            document.setdefault(label, {})[measure] = [[round(t - t0, 3), v] for t, v in samples]
    return document


def run_replay(
    options: ReplayOptions, *, out: IO[str] | None = None, err: IO[str] | None = None
) -> ReplayOutcome:
    """Replay ``options.trace`` in each mode, print the report, write the plot and JSON."""
    out = out or sys.stdout
    outcome = begin_replay(options, out)
    run_modes(options, outcome, err=err)
    finish_replay(options, outcome, out)
    return outcome


def begin_replay(options: ReplayOptions, out: IO[str]) -> ReplayOutcome:
    """Load the trace and print the honesty note; what the runs then fill in."""
    trace = load_trace(options.trace)
    scale = Scale(options.time_scale, options.byte_scale)
    outcome = ReplayOutcome(
        trace=trace,
        plan=make_plan(trace, options.workers or len(trace.workers), scale, "replay"),
        dask=dask_figures(trace.meta),
    )
    print(HONESTY_NOTE, file=out, flush=True)
    return outcome


def run_modes(
    options: ReplayOptions,
    outcome: ReplayOutcome,
    *,
    err: IO[str] | None = None,
    cluster: LocalCluster | None = None,
) -> None:
    """Run each mode of ``options``: on ``cluster`` if given, else on the AMM at
    ``--address``, else each on a fresh local cluster.

    On ``cluster``, the agents are restarted between runs (same names and addresses, under the
    same AMM and dashboard): an agent keeps the heap it grew, so a second run on the same
    processes started 55-70 MiB higher (8 agents, the demo) and reused that memory, which made
    its process memory comparable neither as a peak nor as a rise. At ``--address`` the agents
    are someone else's: the next run waits for what the previous left to settle (``_settle``).
    """
    console = None
    if options.progress:
        from rich.console import Console

        console = Console(file=err or sys.stderr)
    security = Security.from_env() if cluster is None and options.address is not None else None
    for i, amm in enumerate(options.modes):
        if i and cluster is not None:
            cluster.restart_workers()
        elif i and options.address is not None:
            asyncio.run(_settle(options.address, security))
        outcome.runs.append(_run_mode(amm, options, outcome, console, cluster))
    if cluster is not None and len(options.modes) > 1:
        outcome.shared = (
            "Both runs used one AMM and its dashboard; the agents were restarted between them "
            "(same names and addresses), so that each run's process memory starts from fresh "
            "processes, as on separate clusters."
        )
    elif options.address is not None and len(options.modes) > 1:
        outcome.shared = (
            f"Both runs used the agents at {options.address}: the second run's process memory "
            "starts where the first one left it."
        )


def finish_replay(options: ReplayOptions, outcome: ReplayOutcome, out: IO[str]) -> None:
    """Print the report; write the plot and the JSON if asked."""
    trace = outcome.trace
    largest = max(task.nbytes for task in trace.tasks)
    outcome.report = render_report(
        options.trace.name,
        str(trace.meta.get("workload", "")),
        outcome.plan,
        largest,
        outcome.runs,
        outcome.dask,
        outcome.amm_interval,
    )
    if outcome.shared:
        outcome.report += f"\n{outcome.shared}"
    print(f"\n{outcome.report}", file=out, flush=True)
    if options.plot is not None:
        from amm.replay.figure import write_figure

        workload = str(trace.meta.get("workload", options.trace.name)).split(",")[0]
        title = f"{workload} replayed on {outcome.plan.workers} amm agents"
        path = write_figure(outcome.managed, outcome.process, options.plot, title)
        print(f"wrote {path}", file=out)
    if options.json is not None:
        document = report_document(options.trace.name, outcome.plan, outcome.runs, outcome.dask)
        document["samples"] = samples_document(outcome)
        options.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.json}", file=out)


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    """``ReplayOptions`` from the ``amm replay`` subcommand's parsed arguments."""
    return ReplayOptions(
        trace=Path(args.trace),
        workers=args.workers,
        modes=MODES[args.mode],
        time_scale=args.time_scale,
        byte_scale=args.byte_scale,
        address=args.address,
        plot=args.plot,
        json=args.json_path,
        interval=args.interval,
        sample_interval=args.sample_interval,
        progress=not args.no_progress,
    )


def run_command(args: argparse.Namespace) -> int:
    """``amm replay``: 0 when every run passed its end-state check, 1 otherwise."""
    outcome = run_replay(options_from_args(args))
    return 0 if outcome.ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``amm replay`` flags (the CLI's subparser)."""
    parser.add_argument("trace", type=Path, metavar="TRACE", help="a trace (.json or .json.gz)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="agents to replay on (default: as many as the trace's workers; with --address: "
        "all registered agents)",
    )
    parser.add_argument(
        "--amm",
        dest="mode",
        choices=sorted(MODES),
        default="both",
        help="replay with the AMM off, on, or both one after the other (default: both)",
    )
    parser.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="multiply recorded times by X (0.5: twice as fast; default 1)",
    )
    parser.add_argument(
        "--byte-scale",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="multiply recorded sizes by X (0.0625: a 8 MB value is put as 500 KB; default 1)",
    )
    parser.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="replay on the running AMM there and its agents, not on local processes",
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=0.5,
        metavar="SECONDS",
        help="the local AMM's cycle interval (default 0.5; Dask's AMM runs every 2 s)",
    )
    parser.add_argument(
        "--sample-interval",
        type=_positive_float,
        default=0.5,
        metavar="SECONDS",
        help="how often cluster memory is sampled (default 0.5, as Dask's MemorySampler)",
    )
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write the figure")
    parser.add_argument(
        "--json",
        dest="json_path",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the figures and samples as JSON",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return number
