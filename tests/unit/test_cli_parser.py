"""Argument parsing and dispatch of the ``amm`` command, without any server."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime

import pytest

from amm import cli
from amm.cluster import format_interval, parse_ready_line
from amm.models import Rejection


def test_service_and_agent_exec_the_server_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    for argv, module in (
        (["service", "--listen", "h:1"], "amm_service"),
        (["agent", "-h"], "worker_agent"),
    ):
        with pytest.raises(SystemExit):
            cli.main(argv)
        path, args = calls.pop()
        assert path == sys.executable
        assert args == [sys.executable, "-m", module, *argv[1:]]


def test_amm_address_from_flag_env_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMM_ADDRESS", raising=False)
    assert cli.build_parser().parse_args(["status"]).amm == "127.0.0.1:50051"
    monkeypatch.setenv("AMM_ADDRESS", "env:1")
    assert cli.build_parser().parse_args(["status"]).amm == "env:1"
    assert cli.build_parser().parse_args(["--amm", "a:1", "status"]).amm == "a:1"
    assert cli.build_parser().parse_args(["status", "--amm", "b:2"]).amm == "b:2"


def test_verbs_parse() -> None:
    parse = cli.build_parser().parse_args
    assert parse(["run-once"]).wait is True
    assert parse(["run-once", "--no-wait", "--json"]).wait is False
    assert parse(["who-has"]).keys == []
    assert parse(["forget", "a", "b"]).keys == ["a", "b"]
    put = parse(["put", "k", "--value", "v", "--worker", "h:1", "--worker", "h:2"])
    assert (put.key, put.value, put.workers) == ("k", "v", ["h:1", "h:2"])
    assert (parse(["replicate", "a", "b"]).keys, parse(["replicate", "a"]).n) == (["a", "b"], None)
    assert parse(["replicate", "a", "-n", "3", "--json"]).n == 3
    assert parse(["goals"]).keys == []
    assert parse(["goals", "a", "--json"]).keys == ["a"]
    assert (parse(["lost"]).keys, parse(["lost"]).limit) == ([], 1000)
    listed = parse(["lost", "a", "--limit", "5", "--json"])
    assert (listed.keys, listed.limit, listed.json) == (["a"], 5, True)
    cluster = parse(["cluster", "--workers", "3", "--interval", "500ms", "--start"])
    assert (cluster.workers, cluster.interval, cluster.start) == (3, "500ms", True)
    assert cluster.zones == ()
    assert parse(["cluster", "--zones", "a, b"]).zones == ("a", "b")
    assert parse(["run-once"]).dry_run is False
    assert parse(["run-once", "--dry-run", "--json"]).dry_run is True


def test_the_service_takes_flags_for_liveness_grace_and_limits() -> None:
    from amm_service.__main__ import parser
    from amm_service.config import load_config

    argv = ["--stale-after", "1s", "--dead-after", "9s", "--startup-grace", "5s"]
    argv += ["--max-incoming-transfers", "2", "--max-outgoing-transfers", "0"]
    args = vars(parser().parse_args(argv))
    args.pop("config")
    config = load_config(env={}, overrides=args)
    assert (config.stale_seconds, config.dead_after, config.startup_grace) == (1.0, 9.0, 5.0)
    assert (config.max_incoming_transfers, config.max_outgoing_transfers) == (2, 0)


@pytest.mark.parametrize(
    ("argv", "polls"),
    [([], False), (["--no-poll-while-stopped"], False), (["--poll-while-stopped"], True)],
)
def test_the_service_polls_while_stopped_unless_told(argv: list[str], polls: bool) -> None:
    from amm_service.__main__ import parser
    from amm_service.config import load_config

    args = vars(parser().parse_args(argv))
    args.pop("config")
    assert load_config(env={}, overrides=args).poll_while_stopped is polls


@pytest.mark.parametrize(
    "argv",
    [
        ["put", "k"],
        ["put", "k", "--value", "v", "--file", "f"],
        ["forget"],
        ["replicate"],
        ["replicate", "k", "-n", "two"],
        ["nope"],
        [],
        ["cluster", "--zones", "a,,b"],
    ],
)
def test_invalid_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: amm" in capsys.readouterr().err


def test_cluster_interval_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["cluster", "--interval", "soon"])
    assert "invalid duration" in capsys.readouterr().err


def test_json_of_results() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    assert json.loads(cli.to_json({"x": ("h:1",)})) == {"x": ["h:1"]}
    assert json.loads(cli.to_json([Rejection("p", "drop", "k", "r")]))[0]["op"] == "drop"
    assert json.loads(cli.to_json({"at": when})) == {"at": "2026-01-01T00:00:00+00:00"}


def test_ready_lines() -> None:
    line = "amm-service ready address=127.0.0.1:4000 epoch=3"
    assert parse_ready_line(line, "amm-service ready") == {
        "address": "127.0.0.1:4000",
        "epoch": "3",
    }
    assert parse_ready_line("amm-agent ready address=h:1", "amm-agent ready") == {"address": "h:1"}
    assert parse_ready_line("amm-service ready", "amm-service ready") is None
    assert parse_ready_line("INFO starting", "amm-service ready") is None


def test_intervals_use_the_service_syntax() -> None:
    assert format_interval(0.5) == "500ms"
    assert format_interval(2) == "2000ms"
    assert format_interval("2s") == "2s"


def test_retire_takes_workers_or_n_and_its_own_timeout() -> None:
    parse = cli.build_parser().parse_args
    args = parse(["--timeout", "5", "retire", "h:1", "h:2", "--no-close", "--timeout", "2m"])
    assert (args.workers, args.n, args.close) == (["h:1", "h:2"], None, False)
    assert (args.timeout, args.retire_timeout) == (5.0, "2m")
    args = parse(["retire", "-n", "3", "--json"])
    assert (args.workers, args.n, args.close, args.retire_timeout, args.json) == (
        [],
        3,
        True,
        None,
        True,
    )
    with pytest.raises(SystemExit):
        parse(["retire", "--timeout", "soon"])


def test_retire_needs_workers_or_n_but_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--amm", "127.0.0.1:1", "retire"]) == 2
    assert cli.main(["--amm", "127.0.0.1:1", "retire", "h:1", "-n", "1"]) == 2
    assert capsys.readouterr().err.count("give the workers to retire, or -n K") == 2


def test_replay_flags_map_onto_options() -> None:
    from pathlib import Path

    from amm.replay.command import options_from_args

    args = cli.build_parser().parse_args(
        ["replay", "t.json.gz", "--amm", "on", "--workers", "3", "--time-scale", "0.5",
         "--byte-scale", "0.25", "--address", "h:1", "--plot", "p.png", "--json", "r.json",
         "--interval", "2", "--sample-interval", "0.1", "--no-progress"]
    )  # fmt: skip
    options = options_from_args(args)
    assert options.trace == Path("t.json.gz")
    assert options.modes == (True,)
    assert (options.workers, options.time_scale, options.byte_scale) == (3, 0.5, 0.25)
    assert (options.address, options.plot, options.json) == ("h:1", Path("p.png"), Path("r.json"))
    assert (options.interval, options.sample_interval, options.progress) == (2.0, 0.1, False)
    defaults = options_from_args(cli.build_parser().parse_args(["replay", "t.json"]))
    assert defaults.modes == (False, True)
    assert (defaults.workers, defaults.address, defaults.time_scale) == (None, None, 1.0)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--time-scale", "0", "must be a positive number"),
        ("--byte-scale", "inf", "must be a positive number"),
        ("--workers", "0", "must be at least 1"),
        ("--amm", "maybe", "invalid choice: 'maybe'"),
    ],
)
def test_replay_refuses_bad_flags(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["replay", "t.json", flag, value])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "asked", "served"),
    [
        ("127.0.0.1:50051", None, "127.0.0.1:8787"),
        ("[::1]:50051", None, "[::1]:8787"),
        ("127.0.0.1:0", None, "127.0.0.1:0"),
        ("127.0.0.1:50051", "127.0.0.1:9999", "127.0.0.1:9999"),
        ("127.0.0.1:50051", "off", None),
    ],
)
def test_amm_cluster_serves_the_dashboard_on_8787_unless_told(
    listen: str, asked: str | None, served: str | None
) -> None:
    assert cli.dashboard_listen(listen, asked) == served
