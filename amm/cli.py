"""The ``amm`` command: run the service, an agent or a local cluster, and steer a running AMM.

``amm service`` and ``amm agent`` replace themselves (``os.execv``) with ``python -m amm_service``
or ``python -m worker_agent`` so that signals reach the server directly and this package never
imports either. ``amm cluster`` runs a ``LocalCluster`` in the foreground. Every other verb is one
``Client`` call whose result is printed as a plain-text table (see ``amm.tables``) or, with
``--json``, as JSON; ``amm health`` asks any server's grpc.health.v1 status, for container
health checks. Failures print ``error: <STATUS>: <message>`` and exit 1, never a traceback.

Client verbs and ``amm health`` speak TLS when ``AMM_TLS`` names a certs folder, presenting
``AMM_IDENTITY`` (operator) and ``AMM_TOKEN``/``AMM_TOKEN_FILE`` if set (``Security.from_env``).
"""

# ruff: noqa: E402 - the environment is set before grpc is first imported.
from __future__ import annotations

import os

#: gRPC's C core reads its log level once, at import: quiet for the CLI, whose failures are one
#: line of its own (a failed TLS handshake would add gRPC's INFO line), unless the user asked.
QUIET_GRPC = "GRPC_VERBOSITY" not in os.environ
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import NoReturn

import grpc

from amm import certs as certs_command
from amm import health, live, tables
from amm.base.security import Security, SecurityError
from amm.base.security.credentials import ENV_TLS
from amm.base.units import format_bytes, parse_duration
from amm.client import DEFAULT_ADDRESS, Client
from amm.cluster import AGENT_MODULE, SERVICE_MODULE, ClusterError, LocalCluster
from amm.errors import AmmError
from amm.models import Unpinned
from amm.replay import command as replay_command
from amm.replay.runner import ReplayError
from amm.replay.trace import TraceError

EXEC_COMMANDS = {"service": SERVICE_MODULE, "agent": AGENT_MODULE}


def exec_module(module: str, args: Sequence[str]) -> NoReturn:
    """Replace this process with ``python -m module args...``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if QUIET_GRPC:  # servers log as gRPC does by default
        os.environ.pop("GRPC_VERBOSITY", None)
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def _interval(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _zones(value: str) -> tuple[str, ...]:
    zones = tuple(z.strip() for z in value.split(","))
    if not all(zones) or any(" " in z for z in zones):
        raise argparse.ArgumentTypeError(f"expected comma-separated zone names, got {value!r}")
    return zones


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--amm", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    output = argparse.ArgumentParser(add_help=False, parents=[common])
    output.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = argparse.ArgumentParser(
        prog="amm", description="Run and steer an Active Memory Manager and its worker agents."
    )
    parser.add_argument(
        "--amm",
        default=os.environ.get("AMM_ADDRESS", DEFAULT_ADDRESS),
        metavar="HOST:PORT",
        help="the AMM's address (default: $AMM_ADDRESS or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per call (run-once: at least 60)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("service", help="run the AMM (python -m amm_service ARGS...)", add_help=False)
    sub.add_parser(
        "agent", help="run a worker agent (python -m worker_agent ARGS...)", add_help=False
    )
    health_check = sub.add_parser(
        "health", help="grpc.health.v1 check of an AMM or agent: exit 0 when SERVING"
    )
    health_check.add_argument(
        "address", nargs="?", metavar="HOST:PORT", help="the server to ask (default: --amm)"
    )
    health_check.add_argument(
        "--service", default="", metavar="NAME", help="one service's status, not the server's"
    )
    health_check.add_argument(
        "--timeout",
        dest="health_timeout",
        type=float,
        default=health.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the answer (%(default)s)",
    )
    cluster = sub.add_parser("cluster", help="run an AMM and N agents in the foreground")
    cluster.add_argument("--workers", type=int, default=4, metavar="N")
    cluster.add_argument("--listen", default=DEFAULT_ADDRESS, metavar="HOST:PORT")
    cluster.add_argument("--interval", type=_interval, default=None, metavar="DURATION")
    cluster.add_argument("--start", action="store_true", help="start cycling at once")
    cluster.add_argument(
        "--zones",
        type=_zones,
        default=(),
        metavar="A,B,...",
        help="give the agents these zones in turn (failure domains)",
    )
    cluster.add_argument("--logs", action="store_true", help="show the processes' output")
    cluster.add_argument(
        "--dashboard",
        default=None,
        metavar="HOST:PORT|off",
        help="where the AMM serves its dashboard: by default the --listen host on port 8787 "
        "(as Dask's), or port 0 (any free port) when --listen's port is 0",
    )
    cluster.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS everywhere, with a throwaway CA and one identity per agent (deleted on "
        "stop); prints the AMM_TLS to use",
    )

    certs = sub.add_parser(
        "certs",
        help="a cluster CA, identities, tokens and revocations for mutual TLS",
        description="Make and manage the certs folder that --tls DIR and AMM_TLS point at.",
    )
    certs_command.add_arguments(certs)

    replay = sub.add_parser(
        "replay",
        help="replay a recorded trace's data movement with the AMM off and on",
        description="Replay a recorded trace (benchmarks/record_dask_trace.py) on an amm "
        "cluster with the AMM off, on, or both, and report peak memory, wall time and bytes "
        "transferred. A replay of data movement: nothing is computed.",
    )
    replay_command.add_arguments(replay)

    sub.add_parser("start", parents=[common], help="start running cycles")
    sub.add_parser("stop", parents=[common], help="stop running cycles")
    sub.add_parser("running", parents=[output], help="whether cycles run")
    run_once = sub.add_parser("run-once", parents=[output], help="run one cycle now")
    run_once.add_argument("--no-wait", dest="wait", action="store_false")
    run_once.add_argument(
        "--dry-run", action="store_true", help="plan only: show what would be sent, send nothing"
    )
    sub.add_parser("status", parents=[output], help="configuration, last cycle and totals")
    workers = sub.add_parser("workers", parents=[output], help="the registered workers")
    workers.add_argument("--fresh", action="store_true", help="poll every agent first")
    who_has = sub.add_parser("who-has", parents=[output], help="which workers hold each key")
    who_has.add_argument("keys", nargs="*", metavar="KEY")
    has_what = sub.add_parser("has-what", parents=[output], help="which keys each worker holds")
    has_what.add_argument("workers", nargs="*", metavar="WORKER")
    forget = sub.add_parser("forget", parents=[output], help="delete keys on every worker")
    forget.add_argument("keys", nargs="+", metavar="KEY")
    unpin = sub.add_parser(
        "unpin",
        parents=[output],
        help="release pins: one per key and worker, or --all (those of a client that died)",
    )
    unpin.add_argument("keys", nargs="+", metavar="KEY")
    unpin.add_argument(
        "--worker",
        action="append",
        dest="workers",
        metavar="ADDR",
        help="on this worker (repeatable; default: every worker holding the key)",
    )
    unpin.add_argument(
        "--all", dest="every", action="store_true", help="release every pin, not one"
    )
    replicate = sub.add_parser(
        "replicate", parents=[output], help="keep N copies of keys (a tracked goal)"
    )
    replicate.add_argument("keys", nargs="+", metavar="KEY")
    replicate.add_argument(
        "-n",
        type=int,
        default=None,
        metavar="N",
        help="copies to keep (default: every worker, including later ones); 1 removes the goal",
    )
    goals = sub.add_parser("goals", parents=[output], help="replication goals and how they stand")
    goals.add_argument("keys", nargs="*", metavar="KEY")
    lost = sub.add_parser(
        "lost", parents=[output], help="keys lost: their last holder went away, and how"
    )
    lost.add_argument("keys", nargs="*", metavar="KEY")
    lost.add_argument(
        "--limit", type=int, default=1000, metavar="N", help="list at most N (%(default)s)"
    )
    retire = sub.add_parser(
        "retire",
        help="retire workers gracefully (or the N cheapest); exit 1 if any retirement failed",
    )
    retire.add_argument("--amm", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    retire.add_argument("--json", action="store_true", help="print JSON for scripts")
    retire.add_argument("workers", nargs="*", metavar="WORKER")
    retire.add_argument("-n", type=int, metavar="K", help="retire the K cheapest workers")
    retire.add_argument(
        "--no-close", dest="close", action="store_false", help="keep the retired agents running"
    )
    retire.add_argument(
        "--timeout",
        dest="retire_timeout",
        type=_interval,
        metavar="DURATION",
        help="abandon a retirement not finished after this long (default: no limit)",
    )
    events = sub.add_parser(
        "events",
        parents=[output],
        help="the AMM's events, one line each; --follow: keep printing new ones (Ctrl-C ends)",
    )
    events.add_argument("--follow", "-f", action="store_true", help="print new events as they come")
    events.add_argument(
        "--after", type=int, default=None, metavar="SEQ", help="only events after this seq"
    )
    events.add_argument(
        "--incarnation",
        default="",
        metavar="ID",
        help="the AMM run of the --after event: a gap is reported if the AMM restarted since",
    )
    events.add_argument(
        "--kind", action="append", dest="kinds", metavar="KIND", help="only this kind (repeatable)"
    )
    top = sub.add_parser(
        "top", parents=[common], help="a live view of the workers and the cluster (Ctrl-C ends)"
    )
    top.add_argument(
        "--interval",
        type=_interval,
        default=None,
        metavar="DURATION",
        help="refresh every DURATION (default: the AMM's interval)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    put = sub.add_parser("put", parents=[common], help="store a value")
    put.add_argument("key")
    source = put.add_mutually_exclusive_group(required=True)
    source.add_argument("--value", metavar="TEXT", help="the value, as UTF-8 text")
    source.add_argument("--file", type=Path, metavar="PATH", help="read the value (- for stdin)")
    put.add_argument("--worker", action="append", dest="workers", metavar="ADDR")
    get = sub.add_parser("get", parents=[common], help="read a value")
    get.add_argument("key")
    get.add_argument("--worker", metavar="ADDR")
    get.add_argument("--output", "-o", type=Path, metavar="PATH", help="write here, not stdout")
    return parser


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def to_json(value: object) -> str:
    """JSON of a result: dataclasses become objects, tuples lists, datetimes ISO 8601 strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [
            dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for v in value
        ]
    return json.dumps(value, indent=2, default=_json_default)


def _emit(args: argparse.Namespace, value: object, text: Callable[[], str]) -> None:
    print(to_json(value) if getattr(args, "json", False) else text())


def _read_value(args: argparse.Namespace) -> bytes:
    if args.value is not None:
        return str(args.value).encode()
    path: Path = args.file
    return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()


def run_verb(client: Client, args: argparse.Namespace) -> int:
    """Carry out one control verb with ``client`` and print its result."""
    command = args.command
    if command == "start":
        client.amm.start()
        print("AMM started")
    elif command == "stop":
        client.amm.stop()
        print("AMM stopped")
    elif command == "running":
        running = client.amm.running()
        _emit(args, {"running": running}, lambda: "running" if running else "stopped")
    elif command == "run-once":
        report = client.amm.run_once(wait=args.wait, dry_run=args.dry_run)
        _emit(args, report, lambda: tables.render_cycle(report))
    elif command == "status":
        status = client.status()
        _emit(args, status, lambda: tables.render_status(client.address, status))
    elif command == "workers":
        found = client.workers(fresh=args.fresh)
        _emit(args, found, lambda: tables.render_workers(found))
    elif command == "who-has":
        holders = client.who_has(args.keys or None)
        _emit(args, holders, lambda: tables.render_mapping(("KEY", "WORKERS"), holders))
    elif command == "has-what":
        keys = client.has_what(args.workers or None)
        _emit(args, keys, lambda: tables.render_mapping(("WORKER", "KEYS"), keys))
    elif command == "forget":
        try:
            deleted = client.forget(args.keys)
        except AmmError as err:
            if err.status == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in err.message:
                hint = "pins outlive the client that took them: amm unpin --all KEY... frees them"
                raise AmmError(err.status, f"{err.message} ({hint})") from None
            raise
        _emit(args, {"replicas_deleted": deleted}, lambda: f"deleted {deleted} replica(s)")
    elif command == "unpin":
        released = unpin(client, args.keys, args.workers, every=args.every)
        _emit(args, released, lambda: tables.render_unpinned(released))
    elif command == "replicate":
        change = client.replicate(args.keys, n=args.n)
        _emit(args, change, lambda: tables.render_goal_change(change, args.n))
    elif command == "goals":
        goals = client.goals(args.keys or None)
        _emit(args, goals, lambda: tables.render_goals(goals))
    elif command == "lost":
        if args.limit < 1:
            print("error: --limit must be at least 1", file=sys.stderr)
            return 2
        listed = client.lost_keys(args.keys or None, limit=args.limit + 1)
        shown, more = listed[: args.limit], len(listed) > args.limit
        _emit(args, shown, lambda: tables.render_lost(shown, more))
    elif command == "retire":
        if bool(args.workers) == (args.n is not None):
            print("error: give the workers to retire, or -n K", file=sys.stderr)
            return 2
        results = client.retire_workers(
            args.workers or None, n=args.n, close=args.close, timeout=args.retire_timeout
        )
        _emit(args, results, lambda: tables.render_retirements(results))
        return 0 if all(r.retired for r in results) else 1
    elif command == "events":
        return live.run_events(client, args)
    elif command == "top":
        return live.run_top(client, args)
    elif command == "put":
        value = _read_value(args)
        client.put(args.key, value, workers=args.workers)
        where = ", ".join(args.workers) if args.workers else "the least loaded worker"
        print(f"stored {args.key!r} ({format_bytes(len(value))}) on {where}")
    elif command == "get":
        data = client.get(args.key, worker=args.worker)
        if args.output is None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            args.output.write_bytes(data)
    return 0


#: The most pins ``unpin --all`` releases of one key on one worker: a bound, should some reader
#: keep pinning it meanwhile.
MAX_UNPINS = 1_000_000


def unpin(
    client: Client, keys: Sequence[str], workers: Sequence[str] | None, *, every: bool
) -> list[Unpinned]:
    """Release one pin (``every``: all of them) of each key on ``workers``, or on every worker
    holding it. A worker where the key is not pinned counts as nothing released.

    Pins are not leases: an agent cannot tell a client that died from one still reading, so
    the pins of a client that died (a replay killed with ``kill -9``) stay until released here.
    """
    holders = {key: list(workers) for key in keys} if workers else client.who_has(list(keys))
    released: list[Unpinned] = []
    for key in keys:
        for worker in holders.get(key, ()):
            count, left = 0, 0
            while count < MAX_UNPINS:
                try:
                    left = client.unpin(key, worker)
                except AmmError as err:
                    if err.status != grpc.StatusCode.FAILED_PRECONDITION:  # not pinned
                        raise
                    left = 0
                    break
                count += 1
                if not every or left == 0:
                    break
            released.append(Unpinned(key, worker, count, left))
    return released


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


#: What stops ``amm cluster`` cleanly: Ctrl-C, a SIGTERM, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


#: The dashboard's port in ``amm cluster``, as Dask's.
DASHBOARD_PORT = 8787


def dashboard_listen(listen: str, asked: str | None) -> str | None:
    """Where ``amm cluster`` serves the dashboard: ``asked``, None for ``off``, else ``listen``'s
    host on port 8787, or on port 0 when ``listen``'s port is 0 (a throwaway cluster's, say a
    test's, must not contend for a fixed port)."""
    if asked is not None:
        return None if asked.strip().lower() == "off" else asked
    host, _, port = listen.rpartition(":")
    return f"{host}:{0 if port == '0' else DASHBOARD_PORT}"


def run_cluster(args: argparse.Namespace) -> int:
    """``amm cluster``: start, print the addresses, wait for Ctrl-C, SIGTERM or SIGHUP, stop.

    The handlers are installed whatever was inherited: ``amm cluster &`` in a script starts
    with SIGINT ignored, and a closed terminal's SIGHUP would kill us without stopping anything
    (the children, in their own sessions, would then stop by their lifeline alone).
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    cluster: LocalCluster | None = None
    try:
        cluster = LocalCluster(
            args.workers,
            listen=args.listen,
            interval=args.interval,
            start=args.start,
            zones=args.zones,
            echo=sys.stderr if args.logs else None,
            tls=args.tls,
            dashboard=dashboard_listen(args.listen, args.dashboard),
        )
        print(
            tables.render_cluster(
                cluster.address, cluster.workers, cluster.certs, dashboard=cluster.dashboard
            ),
            flush=True,
        )
        while True:
            # A worker retired and closed by the AMM leaves; the others and their data stay.
            for name in cluster.forget_departed_workers():
                _tell(f"{name} exited cleanly and left the cluster")
            if ended := cluster.exited():
                break
            time.sleep(0.5)
        names = ", ".join(f"{name} (exit code {code})" for name, code in ended.items())
        _tell(f"error: {names} ended unexpectedly; stopping the cluster")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if cluster is not None:
            cluster.stop()
            _tell("cluster stopped")
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _tell(line: str) -> None:
    """A line on stderr, which may be gone with its terminal (SIGHUP): then nobody to tell."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def run_health(args: argparse.Namespace) -> int:
    """``amm health``: print the status; exit 0 only when SERVING (a container health check)."""
    status = health.check(
        args.address or args.amm, args.service, args.health_timeout, Security.from_env()
    )
    print(status)
    return 0 if status == health.SERVING else 1


def _hint(err: AmmError) -> str:
    """What a plaintext client hitting a TLS server should try: gRPC only says the socket
    closed."""
    plaintext = not os.environ.get(ENV_TLS)
    if plaintext and err.status is grpc.StatusCode.UNAVAILABLE and "Socket closed" in err.message:
        return f" (if it serves TLS, set {ENV_TLS} to its certs folder)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``amm``; returns the exit code."""
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, where a reader that went away can still be handled
    except BrokenPipeError:
        # The reader of our output left (``amm status --json | head``): it read what it wanted.
        # No message and exit 0, as ``head`` asked for no more; stdout now goes nowhere, so the
        # interpreter's own flush at exit cannot fail either.
        _discard_stdout()
        return 0
    return code


def _discard_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _main(argv: list[str]) -> int:
    if argv and argv[0] in EXEC_COMMANDS:
        exec_module(EXEC_COMMANDS[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "cluster":
            return run_cluster(args)
        if args.command == "health":
            return run_health(args)
        if args.command == "replay":
            return replay_command.run_command(args)
        if args.command == "certs":
            return certs_command.run_command(args)
        with Client(args.amm, timeout=args.timeout, security=Security.from_env()) as client:
            return run_verb(client, args)
    except AmmError as err:
        print(f"error: {err.status.name}: {err.message}{_hint(err)}", file=sys.stderr)
    except BrokenPipeError:
        raise
    except (ClusterError, SecurityError, OSError, TraceError, ReplayError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
