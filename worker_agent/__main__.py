"""Run one worker agent: ``python -m worker_agent --amm HOST:PORT [options]``.

Every flag falls back to an ``AMM_AGENT_<FLAG>`` environment variable (``--memory-limit`` to
``AMM_AGENT_MEMORY_LIMIT``), then to the ``AgentConfig`` default. Once the server is up, one line
goes to stdout, ``amm-agent ready address=HOST:PORT`` (followed by ``metrics=HOST:PORT`` with
``--metrics-listen``), for launchers to wait on. Invalid arguments exit 2 with a message.
Stopping, always with exit code 0:

- SIGTERM (``docker stop``, a Kubernetes or compose scale-down): drain first. The agent asks the
  AMM to copy what only it holds elsewhere and waits for that up to ``--drain-grace`` (20 s),
  then unregisters and exits; what could not be copied is logged by key and recorded as lost by
  the AMM.
- SIGINT (Ctrl-C), or a second signal while draining: stop at once (the AMM records what only
  this worker held as lost).
- An accepted ``Close`` call (the AMM makes it once the worker is retired): it holds nothing.

``--tls DIR`` (or ``AMM_AGENT_TLS``, else ``AMM_TLS``) serves mutual TLS and dials the AMM and
peers with an agent identity of the certs folder: ``--tls-identity``, else the ``--name`` when
the folder holds a certificate of that name, else the shared ``agent``. The worker's name defaults
to a named certificate's name (the AMM accepts no other from it); with the shared identity it is
the advertised address, as without TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amm.base import memdebug
from amm.base.malloc import use_one_arena
from amm.base.security import Security, SecurityError
from amm.base.security.certs import cert_path
from amm.base.security.credentials import ENV_TLS
from amm.base.security.identity import SHARED_AGENT_NAME
from amm.base.serving import handle_stop_signals
from amm.base.units import parse_duration, parse_size
from worker_agent.agent import Agent
from worker_agent.config import DEFAULT_MAX_LEASE, DEFAULT_PAUSE_FRACTION, AgentConfig

log = logging.getLogger("worker_agent")

READY_LINE = "amm-agent ready address={address}"
ENV_PREFIX = "AMM_AGENT_"
_UNSET = object()
"""The default of ``--pause-fraction`` when neither the flag nor its variable is given (not a
string: argparse would convert it)."""


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _fraction(text: str) -> float | None:
    """A fraction, or ``never`` (also ``none``) for an agent that never pauses."""
    if text.strip().lower() in ("never", "none"):
        return None
    return float(text)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}: use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker_agent",
        description="The amm worker agent: holds keyed values in memory and carries out the "
        "AMM's directives. Every flag may also be set as AMM_AGENT_<FLAG>.",
    )

    def add(flag: str, help: str, **kwargs: Any) -> None:
        env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        if env in os.environ:
            # argparse converts a string default with `type`, like a flag.
            kwargs["default"] = os.environ[env]
        parser.add_argument(flag, help=f"{help} [env {env}]", **kwargs)

    add("--amm", "address of the AMM to register with (HOST:PORT); omit to run standalone")
    add("--listen", "address to bind (HOST:PORT, port 0 picks one)", default="127.0.0.1:0")
    add(
        "--advertise",
        "address peers and the AMM dial (default: the bound address); 'auto': this machine's IP "
        "on the route to the AMM with the bound port, for replicated containers (listen on "
        "0.0.0.0:PORT)",
    )
    add("--name", "human-readable worker name (default: the advertised address)")
    add("--zone", "failure domain (rack, zone, host group); copies spread over zones first")
    add("--memory-limit", "memory limit, e.g. 4GiB (default: none)", type=_typed(parse_size))
    add(
        "--pause-fraction",
        "pause (take no new replicas) above this fraction of the memory limit, or never "
        f"(default {DEFAULT_PAUSE_FRACTION} with a memory limit)",
        type=_typed(_fraction),
        default=_UNSET,
    )
    add("--lease", "lease of keep-promises asked of peers (5s)", type=_typed(parse_duration))
    add(
        "--chunk-size",
        "size of the chunks values are sent in (Get, Fetch), at most 8MiB (default 4MiB)",
        type=_typed(parse_size),
    )
    add(
        "--drain-grace",
        "on SIGTERM, how long to wait for the AMM to copy what only this worker holds elsewhere "
        "before stopping anyway (20s; 0: stop at once)",
        type=_typed(parse_duration),
    )
    add(
        "--tombstone-ttl",
        "how long a forgotten key's tombstone is kept: at least the AMM's --tombstone-ttl "
        "(3m; the AMM's default is 2m)",
        type=_typed(parse_duration),
    )
    add(
        "--metrics-listen",
        "serve Prometheus metrics over HTTP on HOST:PORT, e.g. 0.0.0.0:9100 (default: none)",
    )
    add("--log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO", type=_log_level)
    add(
        "--tls",
        f"certs folder (amm certs init): mutual TLS and roles on every call (else ${ENV_TLS})",
        metavar="DIR",
    )
    add(
        "--tls-identity",
        "the agent identity of DIR to present (default: --name if DIR has its certificate, "
        f"else the shared {SHARED_AGENT_NAME!r})",
        metavar="NAME",
    )
    add(
        "--insecure",
        "allow plaintext on an address other than loopback (anyone reaching it reads all data)",
        action="store_const",
        const=True,
        default=False,
    )
    add(
        "--no-bulk",
        "send and fetch values between plaintext agents over gRPC only, without the bulk port "
        "(a second, random port on the --listen host; needed where only the gRPC port is open)",
        action="store_const",
        const=True,
        default=False,
    )
    return parser


def _switch(flag: str, value: object) -> bool:
    """A switch given as a flag (True) or through its variable (``true``/``false``...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{flag} is a switch: set its variable to true or false, not {value!r}")


def _security(args: argparse.Namespace) -> Security | None:
    """The agent's TLS material, from --tls or $AMM_TLS; None for plaintext."""
    folder = args.tls or os.environ.get(ENV_TLS)
    if not folder:
        if args.tls_identity:
            raise ValueError("--tls-identity needs --tls DIR")
        return None
    identity = args.tls_identity
    if identity is None:
        named = args.name and cert_path(Path(folder), args.name).is_file()
        identity = args.name if named else SHARED_AGENT_NAME
    return Security.from_dir(folder, identity=identity)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Raises ValueError with the setting named when a value is out of range, SecurityError
    when the TLS files are missing or unusable."""
    overrides: dict[str, Any] = {
        "amm": args.amm or None,
        "listen": args.listen,
        "advertise": args.advertise or None,
        "name": args.name or None,
        "zone": args.zone or "",
        "metrics_listen": args.metrics_listen or None,
        "security": _security(args),
        "insecure": _switch("--insecure", args.insecure),
        "bulk": not _switch("--no-bulk", args.no_bulk),
    }
    for field in ("memory_limit", "lease", "chunk_size", "drain_grace", "tombstone_ttl"):
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    if args.pause_fraction is not _UNSET:
        if args.pause_fraction is not None and not overrides.get("memory_limit"):
            raise ValueError("--pause-fraction needs --memory-limit: it is a fraction of it")
        overrides["pause_fraction"] = args.pause_fraction
    if "lease" in overrides:
        overrides["max_lease"] = max(DEFAULT_MAX_LEASE, overrides["lease"])
    return AgentConfig(**overrides)


class _Signals:
    """SIGTERM asks for a stop after a drain; SIGINT, or any second signal, for a stop now."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.now = asyncio.Event()
        self.drain = False

    def received(self, sig: signal.Signals) -> None:
        if self.stop.is_set() or sig is not signal.SIGTERM:
            self.now.set()
        else:
            self.drain = True
        self.stop.set()

    def launcher_gone(self) -> None:
        """The launcher died without stopping us (``amm.base.lifeline``): its whole cluster is
        going, so there is nowhere to drain to."""
        self.now.set()
        self.stop.set()

    def installed(self) -> contextlib.AbstractContextManager[None]:
        """Handle both signals while inside the block (containers run us as PID 1), whatever
        their inherited disposition, and a launcher that dies."""
        return handle_stop_signals(self.received, self.launcher_gone)


async def run(config: AgentConfig) -> int:
    """Serve until a signal (see the module docstring); 1 when the address cannot be bound (or
    may not be, in plaintext)."""
    signals = _Signals()
    with signals.installed():
        agent = Agent(config)
        try:
            await agent.start()
        except (OSError, SecurityError) as err:
            print(f"amm-agent: {err}", file=sys.stderr)
            await agent.stop()
            return 1
        try:
            line = READY_LINE.format(address=agent.address)
            if agent.metrics is not None:
                line += f" metrics={agent.metrics.address}"
            print(line, flush=True)
            await _first_of(signals.stop, agent.stopped)
            if signals.drain and not signals.now.is_set() and not agent.stopped.is_set():
                await _drain(agent, signals)
        finally:
            await agent.stop()
    return 0


async def _drain(agent: Agent, signals: _Signals) -> None:
    """Drain ``agent`` unless a second signal (or a Close) cuts it short."""
    log.info(
        "SIGTERM: draining for up to %g s before stopping (SIGINT or another SIGTERM: stop now)",
        agent.config.drain_grace,
    )
    done = asyncio.Event()
    draining = asyncio.create_task(agent.drain(), name="agent drain")
    draining.add_done_callback(lambda _: done.set())
    await _first_of(done, signals.now, agent.stopped)
    if not draining.done():
        log.warning("stopping now, without waiting for the drain to end")
        draining.cancel()
    await asyncio.gather(draining, return_exceptions=True)


async def _first_of(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waiters = [asyncio.create_task(e.wait(), name="agent main wait") for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, SecurityError) as err:
        parser.error(str(err))
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    use_one_arena()  # before gRPC starts its threads
    memdebug.install_from_env()
    return asyncio.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
