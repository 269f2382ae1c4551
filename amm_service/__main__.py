"""``python -m amm_service``: run the AMM service.

Flags override ``AMM_*`` environment variables, which override the YAML file given by
``--config`` (or ``AMM_CONFIG``), which overrides the defaults. Invalid configuration exits with
status 2 and one line saying what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from amm.base import memdebug
from amm.base.security import SecurityError
from amm_service.api.server import run
from amm_service.config import ConfigError, load_config
from amm_service.policies import PolicyError
from amm_service.runtime.records.state import StateError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amm service", description="Run the Active Memory Manager service."
    )
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (127.0.0.1:50051)")
    p.add_argument("--interval", metavar="DURATION", help="time between cycles, e.g. 2s, 500ms")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--start", dest="start", action="store_const", const=True, default=None)
    start.add_argument("--no-start", dest="start", action="store_const", const=False)
    polling = p.add_mutually_exclusive_group()
    polling.add_argument(
        "--poll-while-stopped",
        dest="poll_while_stopped",
        action="store_const",
        const=True,
        default=None,
        help="keep the view current while stopped: poll every agent once an interval",
    )
    polling.add_argument(
        "--no-poll-while-stopped",
        dest="poll_while_stopped",
        action="store_const",
        const=False,
        help="no polls while stopped, unless the dashboard is served (default)",
    )
    p.add_argument("--measure", help="memory measure: process, managed or optimistic")
    p.add_argument("--state", dest="state_path", metavar="PATH", help="SQLite state file")
    p.add_argument("--poll-timeout", metavar="DURATION", help="per-agent poll deadline")
    p.add_argument("--directive-timeout", metavar="DURATION", help="in-flight directive timeout")
    p.add_argument("--stale-after", metavar="DURATION", help="silence before STALE (3 intervals)")
    p.add_argument("--dead-after", metavar="DURATION", help="silence before DEAD (30s)")
    p.add_argument("--startup-grace", metavar="DURATION", help="no drops after a restart (30s)")
    p.add_argument("--max-incoming-transfers", metavar="N", help="per worker, 0: none (10)")
    p.add_argument("--max-outgoing-transfers", metavar="N", help="per worker, 0: none (50)")
    p.add_argument(
        "--tombstone-ttl", metavar="DURATION", help="how long a Forget stays enforced (2m)"
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP (none)"
    )
    p.add_argument(
        "--dashboard-listen",
        metavar="HOST:PORT",
        help="serve the dashboard web page, e.g. 127.0.0.1:8787 (none)",
    )
    p.add_argument(
        "--tls",
        metavar="DIR",
        help="certs folder (amm certs init): mutual TLS and roles on every call [env AMM_TLS]",
    )
    p.add_argument("--tls-identity", metavar="NAME", help="the identity of DIR to present (amm)")
    p.add_argument(
        "--token-listen",
        metavar="HOST:PORT",
        help="a second TLS port where bearer tokens authenticate (needs --tls)",
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        default=None,
        help="allow plaintext on a non-loopback address (anyone reaching it steers the AMM)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        config = load_config(file=config_file, overrides=args)
    except ConfigError as err:
        print(f"amm service: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    memdebug.install_from_env()
    try:
        asyncio.run(run(config))
    except (PolicyError, StateError, SecurityError, OSError) as err:
        print(f"amm service: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
