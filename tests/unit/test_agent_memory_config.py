"""Agent memory figures (optimistic memory, pausing) and configuration validation."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from worker_agent.__main__ import build_parser, config_from_args
from worker_agent.config import AgentConfig
from worker_agent.memory import MemoryMonitor, PsutilProbe


class FixedProbe:
    def __init__(self, value: int) -> None:
        self.value = value

    def process_bytes(self) -> int:
        return self.value


def test_unmanaged_old_is_the_minimum_over_the_window() -> None:
    probe = FixedProbe(1000)
    monitor = MemoryMonitor(probe, window=10.0, limit=5000)
    first = monitor.sample(managed=100, now=0.0)
    assert (first.process, first.unmanaged_old, first.optimistic) == (1000, 900, 1000)
    probe.value = 3000  # a spike of unmanaged memory
    spike = monitor.sample(managed=100, now=5.0)
    assert spike.unmanaged_old == 900
    assert spike.optimistic == 1000
    later = monitor.sample(managed=100, now=16.0)
    assert later.unmanaged_old == 2900, "the spike persisted over the whole window"
    assert later.limit == 5000


def test_unmanaged_is_never_negative() -> None:
    report = MemoryMonitor(FixedProbe(10), window=1.0).sample(managed=50, now=0.0)
    assert report.unmanaged_old == 0
    assert report.optimistic == 50


def test_paused_above_the_fraction_of_the_limit() -> None:
    probe = FixedProbe(800)
    monitor = MemoryMonitor(probe, window=1.0, limit=1000, pause_fraction=0.8)
    assert not monitor.paused(monitor.sample(0, 0.0))
    probe.value = 801
    assert monitor.paused(monitor.sample(0, 1.0))
    never = MemoryMonitor(probe, window=1.0, limit=1000)
    assert not never.paused(never.sample(0, 0.0))


def test_an_agent_process_can_allocate_from_one_arena() -> None:
    """In a process of its own: the setting lasts for the life of the process."""
    code = "from amm.base.malloc import use_one_arena; print(use_one_arena())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.strip() == str(platform.libc_ver()[0] == "glibc")


def test_the_chunk_size_from_a_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parse = build_parser().parse_args
    assert config_from_args(parse([])).chunk_size == 4 * 1024 * 1024
    assert config_from_args(parse(["--chunk-size", "1MiB"])).chunk_size == 1024 * 1024
    monkeypatch.setenv("AMM_AGENT_CHUNK_SIZE", "2MiB")
    assert config_from_args(build_parser().parse_args([])).chunk_size == 2 * 1024 * 1024
    with pytest.raises(ValueError, match="chunk_size must be between"):
        config_from_args(parse(["--chunk-size", "1GiB"]))


def test_psutil_probe_measures_this_process() -> None:
    assert PsutilProbe().process_bytes() > 1024 * 1024


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen": "nowhere"}, "listen must be HOST:PORT"),
        ({"amm": "host:port"}, "amm must be HOST:PORT"),
        ({"memory_limit": -1}, "memory_limit"),
        ({"pause_fraction": 1.5, "memory_limit": 10}, "pause_fraction must be in"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"lease": 0}, "lease must be a positive"),
        ({"lease": 90}, "must not exceed max_lease"),
        ({"max_concurrent_directives": 0}, "max_concurrent_directives"),
        ({"zone": "rack a"}, "zone must not contain whitespace"),
        ({"drain_grace": -1}, "drain_grace must be >= 0"),
        ({"drain_grace": float("inf")}, "drain_grace must be >= 0"),
    ],
)
def test_invalid_settings_name_themselves(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentConfig(**kwargs)  # type: ignore[arg-type]


def test_flags_and_environment_make_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMM_AGENT_MEMORY_LIMIT", "2GiB")
    args = build_parser().parse_args(
        ["--amm", "127.0.0.1:50051", "--pause-fraction", "0.8", "--lease", "90s", "--name", "w1"]
    )
    config = config_from_args(args)
    assert config.amm == "127.0.0.1:50051"
    assert config.memory_limit == 2 * 1024**3
    assert config.pause_fraction == 0.8
    assert config.lease == 90.0
    assert config.max_lease >= 90.0
    assert config.name == "w1"
    assert config.zone == ""


def test_the_drain_grace_is_20s_below_kubernetes_30s_and_set_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parse = build_parser().parse_args
    assert config_from_args(parse([])).drain_grace == 20.0
    assert config_from_args(parse(["--drain-grace", "5s"])).drain_grace == 5.0
    assert config_from_args(parse(["--drain-grace", "0"])).drain_grace == 0.0
    monkeypatch.setenv("AMM_AGENT_DRAIN_GRACE", "1m")
    assert config_from_args(build_parser().parse_args([])).drain_grace == 60.0


def test_the_zone_from_a_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args(build_parser().parse_args(["--zone", "rack-1"])).zone == "rack-1"
    monkeypatch.setenv("AMM_AGENT_ZONE", "rack-2")
    assert config_from_args(build_parser().parse_args([])).zone == "rack-2"
    assert config_from_args(build_parser().parse_args(["--zone", "rack-3"])).zone == "rack-3"


def test_pause_fraction_defaults_to_0_8_of_a_memory_limit() -> None:
    parse = build_parser().parse_args
    limited = config_from_args(parse(["--memory-limit", "1GiB"]))
    assert limited.pause_fraction == 0.8
    probe = FixedProbe(int(0.8 * 1024**3) + 1)
    monitor = MemoryMonitor(probe, window=1.0, limit=1024**3, pause_fraction=0.8)
    assert monitor.paused(monitor.sample(0, 0.0))
    never = config_from_args(parse(["--memory-limit", "1GiB", "--pause-fraction", "never"]))
    assert never.pause_fraction is None
    assert AgentConfig().pause_fraction == 0.8, "ignored without a memory limit"
    assert not MemoryMonitor(probe, window=1.0, pause_fraction=0.8).paused(monitor.sample(0, 0.0))


@pytest.mark.parametrize(
    "argv",
    [
        ["--memory-limit", "lots"],
        ["--lease", "soon"],
        ["--log-level", "chatty"],
        ["--listen", "nowhere"],
        ["--pause-fraction", "0.5"],
        ["--zone", "rack 1"],
        ["--drain-grace", "later"],
        ["--drain-grace", "-5s"],
    ],
)
def test_invalid_flags_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from worker_agent.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err
