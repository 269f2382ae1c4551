"""The service config loader: layer precedence, spellings, units, policies and every error path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from amm_service.config import (
    DEFAULT_POLICIES,
    ENV_VARS,
    AmmConfig,
    ConfigError,
    PolicySpec,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "amm.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_source() -> None:
    assert load_config(env={}) == AmmConfig()
    assert AmmConfig().policies == DEFAULT_POLICIES


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "interval: 3s\nmeasure: process\nlisten: 0.0.0.0:1\nlog-level: debug\nstart: true\n",
    )
    env = {"AMM_MEASURE": "managed", "AMM_LISTEN": "0.0.0.0:2", "AMM_START": "off"}
    cfg = load_config(file=path, env=env, overrides={"listen": "0.0.0.0:3", "start": None})

    assert cfg.poll_timeout == 1.0  # default
    assert cfg.interval == 3.0  # file
    assert cfg.log_level == "DEBUG"  # file
    assert cfg.measure == "managed"  # env over file
    assert cfg.start is False  # env over file; a None override is a flag not given
    assert cfg.listen == "0.0.0.0:3"  # override over env and file


def test_file_from_amm_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "poll-timeout: 250ms\n")
    assert load_config(env={"AMM_CONFIG": str(path)}).poll_timeout == 0.25


def test_explicit_file_wins_over_amm_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "interval: 7\n")
    cfg = load_config(file=str(path), env={"AMM_CONFIG": str(tmp_path / "missing.yaml")})
    assert cfg.interval == 7.0


def test_dashes_and_underscores_are_the_same_key(tmp_path: Path) -> None:
    dashes = load_config(file=write(tmp_path, "directive-timeout: 5s\nstate-path: x.db\n"), env={})
    underscores = load_config(
        file=write(tmp_path, "directive_timeout: 5s\nstate_path: x.db\n"), env={}
    )
    flags = load_config(env={}, overrides={"directive-timeout": "5s", "state_path": "x.db"})
    assert dashes == underscores == flags
    assert dashes.directive_timeout == 5.0
    assert dashes.state_path == "x.db"


def test_both_spellings_in_one_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "poll-timeout: 1s\npoll_timeout: 2s\n")
    with pytest.raises(ConfigError, match="poll_timeout twice"):
        load_config(file=path, env={})


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1.5m", 90.0), ("3", 3.0), (4, 4.0), (0.25, 0.25)],
)
def test_durations(raw: str | float, seconds: float) -> None:
    assert load_config(env={}, overrides={"interval": raw}).interval == seconds


def test_all_env_vars(tmp_path: Path) -> None:
    env = {
        "AMM_LISTEN": "[::1]:50052",
        "AMM_INTERVAL": "500ms",
        "AMM_START": "YES",
        "AMM_POLL_WHILE_STOPPED": "yes",
        "AMM_MEASURE": "Process",
        "AMM_STATE": ":memory:",
        "AMM_POLL_TIMEOUT": "2s",
        "AMM_DIRECTIVE_TIMEOUT": "1m",
        "AMM_MAX_REFUSALS_KEPT": "7",
        "AMM_LOG_LEVEL": "warning",
        "AMM_POLICIES": '[{"class": "mypkg.P", "n": 2}]',
        "AMM_STALE_AFTER": "5s",
        "AMM_DEAD_AFTER": "1m",
        "AMM_STARTUP_GRACE": "10s",
        "AMM_MAX_INCOMING_TRANSFERS": "3",
        "AMM_MAX_OUTGOING_TRANSFERS": "0",
        "AMM_TOMBSTONE_TTL": "1h",
        "AMM_METRICS_LISTEN": "0.0.0.0:9051",
        "AMM_DASHBOARD_LISTEN": "0.0.0.0:8787",
        "AMM_TLS": "/etc/amm/certs",
        "AMM_TLS_IDENTITY": "amm-2",
        "AMM_TOKEN_LISTEN": "0.0.0.0:50052",
        "AMM_INSECURE": "off",
    }
    assert set(env) == set(ENV_VARS.values())
    assert load_config(env=env) == AmmConfig(
        listen="[::1]:50052",
        interval=0.5,
        start=True,
        poll_while_stopped=True,
        measure="process",
        policies=(PolicySpec("mypkg.P", {"n": 2}),),
        state_path=":memory:",
        poll_timeout=2.0,
        directive_timeout=60.0,
        max_refusals_kept=7,
        log_level="WARNING",
        stale_after=5.0,
        dead_after=60.0,
        startup_grace=10.0,
        max_incoming_transfers=3,
        max_outgoing_transfers=0,
        tombstone_ttl=3600.0,
        metrics_listen="0.0.0.0:9051",
        dashboard_listen="0.0.0.0:8787",
        tls="/etc/amm/certs",
        tls_identity="amm-2",
        token_listen="0.0.0.0:50052",
        insecure=False,
    )


def test_tls_keys_from_a_file_and_their_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "tls: certs\ntoken-listen: 0.0.0.0:50052\ninsecure: true\n")
    cfg = load_config(file=path, env={})
    assert (cfg.tls, cfg.tls_identity, cfg.token_listen, cfg.insecure) == (
        "certs",
        "amm",
        "0.0.0.0:50052",
        True,
    )
    assert load_config(env={}) == AmmConfig()
    assert AmmConfig().tls is None
    with pytest.raises(ConfigError, match="token_listen needs tls"):
        load_config(env={}, overrides={"token_listen": "127.0.0.1:0"})
    with pytest.raises(ConfigError, match=r"invalid token_listen 'nope' \(from --token-listen\)"):
        load_config(env={}, overrides={"tls": "d", "token_listen": "nope"})
    with pytest.raises(ConfigError, match=r"invalid tls_identity 'Amm'.*DNS label"):
        load_config(env={"AMM_TLS_IDENTITY": "Amm"})
    with pytest.raises(ConfigError, match="invalid insecure 'maybe'"):
        load_config(env={"AMM_INSECURE": "maybe"})


def test_transfer_limits_reject_negative_counts() -> None:
    with pytest.raises(ConfigError, match=r"max_incoming_transfers.*whole number >= 0"):
        load_config(env={}, overrides={"max-incoming-transfers": "-1"})


def test_stale_after_defaults_to_three_intervals() -> None:
    assert load_config(env={}, overrides={"interval": "1s"}).stale_seconds == 3.0
    assert load_config(env={}, overrides={"stale-after": "7s"}).stale_seconds == 7.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("1", True), ("On", True), ("false", False), ("0", False), ("NO", False)],
)
def test_env_booleans(raw: str, expected: bool) -> None:
    assert load_config(env={"AMM_START": raw}).start is expected


def test_unrelated_amm_env_vars_are_not_errors() -> None:
    env = {"AMM_ADDRESS": "10.0.0.1:50051", "AMM_SOMETHING_ELSE": "x", "AMM_CONFIG": ""}
    assert load_config(env=env) == AmmConfig()


def test_empty_env_var_counts_as_unset() -> None:
    assert load_config(env={"AMM_MEASURE": ""}).measure == "optimistic"


def test_policies_from_yaml_with_kwargs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "policies:\n"
        "  - class: amm_service.policies.reduce_replicas.ReduceReplicas\n"
        "  - class: mypkg.MyPolicy\n"
        "    threshold: 0.5\n"
        "    keys: [a, b]\n",
    )
    cfg = load_config(file=path, env={})
    assert cfg.policies == (
        PolicySpec("amm_service.policies.reduce_replicas.ReduceReplicas", {}),
        PolicySpec("mypkg.MyPolicy", {"threshold": 0.5, "keys": ["a", "b"]}),
    )
    assert dict(cfg.policies[1].kwargs) == {"threshold": 0.5, "keys": ["a", "b"]}


def test_empty_policy_list_is_allowed(tmp_path: Path) -> None:
    assert load_config(file=write(tmp_path, "policies: []\n"), env={}).policies == ()


def test_policy_kwargs_are_a_read_only_copy() -> None:
    kwargs: dict[str, object] = {"n": 1}
    spec = PolicySpec("mypkg.P", kwargs)
    kwargs["n"] = 2
    assert spec.kwargs["n"] == 1
    with pytest.raises(TypeError):
        spec.kwargs["n"] = 3  # type: ignore[index]


def test_policy_specs_pass_through_overrides() -> None:
    specs = (PolicySpec("mypkg.P", {"n": 1}),)
    assert load_config(env={}, overrides={"policies": specs}).policies == specs


@pytest.mark.parametrize(
    ("policies", "words"),
    [
        ("mypkg.P", "expected a list of policies"),
        ("[mypkg.P]", r"policies\[0\].*expected a mapping with a 'class' key"),
        ("[{threshold: 1}]", r"policies\[0\].*'class' must be a non-empty dotted path"),
        ("[{class: ''}]", "'class' must be a non-empty dotted path"),
        ("[{class: [a]}]", "'class' must be a non-empty dotted path"),
        ("[{class: a.B}, {class: a.C, 1: x}]", r"policies\[1\].*argument names must be strings"),
        ("[{class: a.B", "not valid YAML/JSON"),
    ],
)
def test_invalid_policies(policies: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"AMM_POLICIES": policies})
    assert "(from AMM_POLICIES)" in str(info.value)
    assert re.search(words, str(info.value))


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("AMM_MEASURE", "rss", "choose one of managed, optimistic, process"),
        ("AMM_START", "maybe", "choose one of 0, 1, false, no, off, on, true, yes"),
        ("AMM_LOG_LEVEL", "loud", "choose one of CRITICAL, DEBUG, ERROR, INFO, WARNING"),
        ("AMM_INTERVAL", "0", "must be a finite duration > 0"),
        ("AMM_INTERVAL", "fast", "invalid duration"),
        ("AMM_POLL_TIMEOUT", "0s", "> 0"),
        ("AMM_DIRECTIVE_TIMEOUT", "-1", "invalid duration"),
        ("AMM_MAX_REFUSALS_KEPT", "-1", "whole number >= 0"),
        ("AMM_MAX_REFUSALS_KEPT", "1.5", "whole number >= 0"),
        ("AMM_LISTEN", "localhost", "HOST:PORT"),
        ("AMM_LISTEN", "localhost:65536", "port 0-65535"),
        ("AMM_LISTEN", "::1:50051", "HOST:PORT"),
        ("AMM_LISTEN", "[::g]:50051", "bad IPv6 address"),
    ],
)
def test_invalid_env_values_name_the_variable(var: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={var: value})
    message = str(info.value)
    assert f"(from {var})" in message
    assert repr(value) in message
    assert words in message


def test_exact_message_for_an_enumeration() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"AMM_MEASURE": "rss"})
    assert str(info.value) == (
        "invalid measure 'rss' (from AMM_MEASURE): choose one of managed, optimistic, process"
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:50051", "[::]:65535", "my-host:80"])
def test_valid_listen_addresses(listen: str) -> None:
    assert load_config(env={}, overrides={"listen": listen}).listen == listen


def test_invalid_file_value_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "interval: 0s\n")
    with pytest.raises(ConfigError, match=re.escape(f"invalid interval '0s' (from {path})")):
        load_config(file=path, env={})


def test_invalid_file_value_is_an_error_even_if_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, "measure: rss\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(file=path, env={}, overrides={"measure": "managed"})


def test_invalid_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"\(from --directive-timeout\)"):
        load_config(env={}, overrides={"directive_timeout": "soon"})


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(env={}, overrides={"bogus": 1})


def test_unknown_file_key_lists_the_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "intervall: 2s\n")
    with pytest.raises(ConfigError) as info:
        load_config(file=path, env={})
    message = str(info.value)
    assert "unknown key 'intervall'" in message
    assert str(path) in message
    for key in ("listen", "interval", "directive-timeout", "max-refusals-kept", "log-level"):
        assert key in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"{path} must hold a mapping")):
        load_config(file=path, env={})


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(file=write(tmp_path, ""), env={}) == AmmConfig()


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "interval: [1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid YAML")):
        load_config(file=path, env={})


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {path}:")):
        load_config(file=path, env={})
    with pytest.raises(ConfigError, match=re.escape(f"{path} (from AMM_CONFIG)")):
        load_config(env={"AMM_CONFIG": str(path)})


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*ENV_VARS.values(), "AMM_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AMM_INTERVAL", "250ms")
    assert load_config().interval == 0.25


def test_config_is_frozen() -> None:
    cfg = AmmConfig()
    with pytest.raises(AttributeError):
        cfg.interval = 1.0  # type: ignore[misc]
