"""The AMM service's one config tree and the pure loader that validates it once.

Layers, later wins: the defaults of :class:`AmmConfig` < a YAML file < ``AMM_*`` environment
variables < overrides (the CLI flags). Every value is validated where it is read, so an error names
its source (file path, variable or flag) and, for enumerations, the allowed values.

Not covered here: whether a policy class can be imported and accepts its kwargs; the policy
registry checks that at start-up.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import yaml

from amm.base.security import SecurityError
from amm.base.security.identity import check_name
from amm.base.units import parse_duration
from amm_service.decisions.view import MEASURES, Measure

CONFIG_ENV = "AMM_CONFIG"
"""The environment variable naming the YAML file when ``load_config(file=None)``."""

ENV_VARS: Mapping[str, str] = MappingProxyType(
    {
        "listen": "AMM_LISTEN",
        "interval": "AMM_INTERVAL",
        "start": "AMM_START",
        "poll_while_stopped": "AMM_POLL_WHILE_STOPPED",
        "measure": "AMM_MEASURE",
        "policies": "AMM_POLICIES",
        "state_path": "AMM_STATE",
        "poll_timeout": "AMM_POLL_TIMEOUT",
        "directive_timeout": "AMM_DIRECTIVE_TIMEOUT",
        "max_refusals_kept": "AMM_MAX_REFUSALS_KEPT",
        "stale_after": "AMM_STALE_AFTER",
        "dead_after": "AMM_DEAD_AFTER",
        "startup_grace": "AMM_STARTUP_GRACE",
        "max_incoming_transfers": "AMM_MAX_INCOMING_TRANSFERS",
        "max_outgoing_transfers": "AMM_MAX_OUTGOING_TRANSFERS",
        "tombstone_ttl": "AMM_TOMBSTONE_TTL",
        "log_level": "AMM_LOG_LEVEL",
        "metrics_listen": "AMM_METRICS_LISTEN",
        "dashboard_listen": "AMM_DASHBOARD_LISTEN",
        # AMM_TLS is also where the CLI finds its certs folder (amm.base.security): one variable
        # for a machine that runs both.
        "tls": "AMM_TLS",
        "tls_identity": "AMM_TLS_IDENTITY",
        "token_listen": "AMM_TOKEN_LISTEN",
        "insecure": "AMM_INSECURE",
    }
)
"""Field -> the environment variable that sets it. Only these names are read and validated: other
``AMM_*`` variables (``AMM_ADDRESS`` of the CLI client, ``AMM_CONFIG``) are not ours to reject."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names the source and how to fix it."""


@dataclass(frozen=True)
class PolicySpec:
    """A policy to instantiate: a dotted class path (or built-in name) and its keyword arguments.

    ``kwargs`` is a read-only copy; the spec is not hashable because kwargs may hold lists.
    """

    class_path: str
    kwargs: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))


DEFAULT_POLICIES = (
    PolicySpec("amm_service.policies.replication.Replicate", {}),
    PolicySpec("amm_service.policies.reduce_replicas.ReduceReplicas", {}),
    PolicySpec("amm_service.policies.retire_worker.RetireWorker", {}),
)
"""Replicate does nothing until a goal is set and RetireWorker nothing until a retirement is asked
for, so goals and ``RetireWorkers`` work out of the box."""


@dataclass(frozen=True, slots=True)
class AmmConfig:
    """Everything the AMM service is configured with; build it with :func:`load_config`."""

    listen: str = "127.0.0.1:50051"
    """``HOST:PORT`` the gRPC server binds (``[::1]:50051`` for IPv6; port 0 picks a free port)."""
    interval: float = 2.0
    """Seconds between two AMM cycles; > 0. Default 2s."""
    start: bool = False
    """Whether the AMM starts cycling at boot, rather than wait for a start request. Default off."""
    poll_while_stopped: bool = False
    """Whether a stopped AMM still polls every agent once an interval (changes only; it plans and
    sends nothing), so that queries answer from a current view without a fresh poll. Off: no
    polls while stopped, unless the dashboard is served (it samples memory). Default off: after
    a bulk load, a start overlapped a round that had read part of the load as a snapshot, and
    took the rest in as changes, key by key (100k keys on 4 agents converged 2 s later)."""
    measure: Measure = "optimistic"
    """The memory figure policies use: process (RSS), managed or optimistic. Default optimistic."""
    policies: tuple[PolicySpec, ...] = DEFAULT_POLICIES
    """Policies run each cycle, in order of priority. Default: Replicate, ReduceReplicas and
    RetireWorker."""
    state_path: str = ".amm/state.sqlite3"
    """SQLite file of the persistent state (epoch, running flag, known workers); ``:memory:``
    keeps nothing across restarts. Default ``.amm/state.sqlite3``."""
    poll_timeout: float = 1.0
    """Seconds each agent has to answer a poll; > 0. Default 1s."""
    directive_timeout: float = 30.0
    """Seconds after which a directive without an outcome is forgotten by the in-flight ledger;
    > 0. Default 30s."""
    max_refusals_kept: int = 100
    """How many recent refusals (rejected suggestions, refused directives) are kept for
    diagnostics; >= 0. Default 100."""
    log_level: str = "INFO"
    """Logging level name: DEBUG, INFO, WARNING, ERROR or CRITICAL. Default INFO."""
    stale_after: float | None = None
    """Seconds without an answered poll after which a worker is STALE: it receives no new
    replicas and its copies do not count as durable. Default (unset): three intervals."""
    dead_after: float = 30.0
    """Seconds without an answered poll after which a worker is DEAD: removed from the view, its
    keys' replica counts drop, keys left without a copy are reported LOST. Default 30s."""
    startup_grace: float = 30.0
    """Seconds a freshly started AMM issues no drops while workers it knew from its state file
    have not reported yet, so a restart never drops a replica it cannot see. Default 30s."""
    max_incoming_transfers: int = 10
    """Replications in flight onto one worker at most; 0 means no limit. Default 10."""
    max_outgoing_transfers: int = 50
    """Replications in flight served by one worker (the first source) at most; 0 means no limit.
    Default 50."""
    tombstone_ttl: float = 120.0
    """Seconds a forgotten key's tombstone is kept: while it lives, copies of the key that were
    under way are discarded and none is planned, until the key is put again. It must outlive
    every copy under way at the Forget (an agent's fetch gives up after 30 s, a directive after
    ``directive_timeout``) and reach every live worker (a silent one is dead after
    ``dead_after``); agents keep theirs longer (3m). Default 2m."""
    metrics_listen: str | None = None
    """``HOST:PORT`` to serve Prometheus metrics on over HTTP; unset serves none. Default unset."""
    dashboard_listen: str | None = None
    """``HOST:PORT`` to serve the dashboard on (HTTPS with ``tls``; without it, loopback only
    unless ``insecure``); unset serves none. Default unset (``amm cluster`` and the compose file
    turn it on, on 8787 as Dask's)."""
    tls: str | None = None
    """The certs folder (``amm certs init``): serve mutual TLS, authorize every call by role, and
    dial agents with this identity. Default (unset): plaintext, on loopback only."""
    tls_identity: str = "amm"
    """Which identity of the certs folder the AMM presents; it must have the amm role."""
    token_listen: str | None = None
    """``HOST:PORT`` of a second, TLS port where bearer tokens (``amm certs token``)
    authenticate; needs ``tls``. Default (unset): none."""
    insecure: bool = False
    """Serve plaintext on an address other than loopback, where anyone who can reach it may
    steer the AMM. Default off: such a ``listen`` without ``tls`` refuses to start."""

    @property
    def stale_seconds(self) -> float:
        """``stale_after``, or three intervals when unset."""
        return self.stale_after if self.stale_after is not None else 3 * self.interval


_FIELDS = tuple(f.name for f in fields(AmmConfig))
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_MEASURES: Mapping[str, Measure] = {m: m for m in sorted(MEASURES)}
_LOG_LEVELS = ("CRITICAL", "DEBUG", "ERROR", "INFO", "WARNING")
_LISTEN = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>[0-9]{1,5})$")


def _fail(name: str, value: object, source: str, why: str) -> ConfigError:
    return ConfigError(f"invalid {name} {value!r} (from {source}): {why}")


def _choice(name: str, value: object, source: str, allowed: Sequence[str]) -> ConfigError:
    return _fail(name, value, source, f"choose one of {', '.join(sorted(allowed))}")


def _address(name: str) -> Callable[[object, str], str]:
    def convert(value: object, source: str) -> str:
        match = _LISTEN.match(value) if isinstance(value, str) else None
        if match is None or int(match["port"]) > 65535:
            raise _fail(
                name,
                value,
                source,
                "expected HOST:PORT with port 0-65535, e.g. "
                "127.0.0.1:50051, 0.0.0.0:50051 or [::1]:50051",
            )
        if match["v6"] is not None:
            try:
                ipaddress.IPv6Address(match["v6"])
            except ValueError as exc:
                raise _fail(name, value, source, f"bad IPv6 address in brackets: {exc}") from None
        return str(value)

    return convert


def _duration(name: str) -> Callable[[object, str], float]:
    def convert(value: object, source: str) -> float:
        if not isinstance(value, str | int | float):
            raise _fail(name, value, source, "expected a duration such as 2s or 500ms")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _fail(name, value, source, str(exc)) from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise _fail(name, value, source, "must be a finite duration > 0, e.g. 2s or 500ms")
        return seconds

    return convert


def _bool(name: str) -> Callable[[object, str], bool]:
    def convert(value: object, source: str) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str | int) else ""
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _choice(name, value, source, sorted(_TRUE | _FALSE))

    return convert


def _folder(value: object, source: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail("tls", value, source, "expected a certs folder (amm certs init DIR)")
    return value


def _identity(value: object, source: str) -> str:
    try:
        return check_name(value if isinstance(value, str) else "")
    except SecurityError as err:
        raise _fail("tls_identity", value, source, str(err)) from None


def _measure(value: object, source: str) -> Measure:
    measure = _MEASURES.get(value.strip().lower()) if isinstance(value, str) else None
    if measure is None:
        raise _choice("measure", value, source, list(_MEASURES))
    return measure


def _state_path(value: object, source: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise _fail("state_path", value, source, "expected a file path or :memory:")
    return value


def _max_refusals(value: object, source: str) -> int:
    try:
        count = int(value) if isinstance(value, str | int) and not isinstance(value, bool) else -1
    except ValueError:
        count = -1
    if count < 0:
        raise _fail("max_refusals_kept", value, source, "expected a whole number >= 0")
    return count


def _count(name: str) -> Callable[[object, str], int]:
    def convert(value: object, source: str) -> int:
        try:
            count = (
                int(value) if isinstance(value, str | int) and not isinstance(value, bool) else -1
            )
        except ValueError:
            count = -1
        if count < 0:
            raise _fail(name, value, source, "expected a whole number >= 0 (0: no limit)")
        return count

    return convert


def _log_level(value: object, source: str) -> str:
    level = value.strip().upper() if isinstance(value, str) else ""
    if level not in _LOG_LEVELS:
        raise _choice("log_level", value, source, _LOG_LEVELS)
    return level


def _policies(value: object, source: str) -> tuple[PolicySpec, ...]:
    """A list of ``{class: dotted.Path, **kwargs}`` mappings, or its YAML/JSON text (env, flags)."""
    example = "e.g. [{class: mypkg.MyPolicy, threshold: 0.5}]"
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise _fail("policies", value, source, f"not valid YAML/JSON ({exc})") from None
    if not isinstance(value, list | tuple):
        raise _fail("policies", value, source, f"expected a list of policies, {example}")
    specs = []
    for i, item in enumerate(value):
        if isinstance(item, PolicySpec):
            specs.append(item)
            continue
        where = f"policies[{i}]"
        if not isinstance(item, Mapping):
            raise _fail(where, item, source, f"expected a mapping with a 'class' key, {example}")
        class_path = item.get("class")
        if not isinstance(class_path, str) or not class_path.strip():
            raise _fail(where, item, source, f"'class' must be a non-empty dotted path, {example}")
        kwargs = {k: v for k, v in item.items() if k != "class"}
        if bad := [k for k in kwargs if not isinstance(k, str)]:
            raise _fail(where, item, source, f"argument names must be strings, not {bad!r}")
        specs.append(PolicySpec(class_path.strip(), kwargs))
    return tuple(specs)


_CONVERTERS: Mapping[str, Callable[[object, str], object]] = {
    "listen": _address("listen"),
    "interval": _duration("interval"),
    "start": _bool("start"),
    "poll_while_stopped": _bool("poll_while_stopped"),
    "measure": _measure,
    "policies": _policies,
    "state_path": _state_path,
    "poll_timeout": _duration("poll_timeout"),
    "directive_timeout": _duration("directive_timeout"),
    "max_refusals_kept": _max_refusals,
    "log_level": _log_level,
    "stale_after": _duration("stale_after"),
    "dead_after": _duration("dead_after"),
    "startup_grace": _duration("startup_grace"),
    "max_incoming_transfers": _count("max_incoming_transfers"),
    "max_outgoing_transfers": _count("max_outgoing_transfers"),
    "tombstone_ttl": _duration("tombstone_ttl"),
    "metrics_listen": _address("metrics_listen"),
    "dashboard_listen": _address("dashboard_listen"),
    "tls": _folder,
    "tls_identity": _identity,
    "token_listen": _address("token_listen"),
    "insecure": _bool("insecure"),
}


def _field_name(key: object, source: str) -> str:
    name = key.replace("-", "_") if isinstance(key, str) else None
    if name is None or name not in _CONVERTERS:
        valid = ", ".join(f.replace("_", "-") for f in _FIELDS)
        raise ConfigError(
            f"unknown key {key!r} (from {source}): valid keys are {valid} (dashes or underscores)"
        )
    return name


def _read_file(path: str, origin: str) -> dict[str, Any]:
    """Field -> converted value (``Any``: each converter returns its field's type)."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}{origin}: {exc.strerror or exc}"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of settings at top level, "
            f"not a {type(data).__name__}"
        )
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = _field_name(key, path)
        if name in values:
            raise ConfigError(
                f"config file {path} sets {name} twice (dashes and underscores name the same key)"
            )
        values[name] = _CONVERTERS[name](value, path)
    return values


def load_config(
    *,
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AmmConfig:
    """Build the validated config from defaults < ``file`` < ``env`` < ``overrides``.

    ``file`` defaults to ``env["AMM_CONFIG"]`` if set; ``env`` defaults to ``os.environ``. Of the
    environment only the names in :data:`ENV_VARS` are read; an empty variable counts as unset.
    ``overrides`` are the CLI flags, keyed by field name (dashes allowed); a ``None`` value is a
    flag not given. Raises :class:`ConfigError` on any invalid value.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    path = os.fspath(file) if file is not None else environ.get(CONFIG_ENV) or None
    origin = f" (from {CONFIG_ENV})" if file is None else ""
    values = _read_file(path, origin) if path is not None else {}
    for name, var in ENV_VARS.items():
        if raw := environ.get(var):
            values[name] = _CONVERTERS[name](raw, var)
    for key, value in (overrides or {}).items():
        name = _field_name(key, "overrides")
        if value is not None:
            values[name] = _CONVERTERS[name](value, f"--{name.replace('_', '-')}")
    if values.get("token_listen") and not values.get("tls"):
        raise ConfigError("token_listen needs tls: bearer tokens travel over TLS only (--tls DIR)")
    return replace(AmmConfig(), **values)
