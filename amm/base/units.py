"""Parsing and printing of the human units used in configuration: durations and byte sizes.

Shared by the service, the agents and the CLI so that ``2s``, ``500ms`` or ``4GiB`` mean the same
everywhere. Invalid input raises ``ValueError`` with a message naming the accepted forms.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``2s``, ``500ms``, ``1.5m``, ``250us`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _NUMBER.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _DURATION_UNITS):
            raise ValueError(
                f"invalid duration {value!r}: use a number with a unit among "
                f"{', '.join(sorted(set(_DURATION_UNITS)))} (for example 2s or 500ms)"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS.get(unit, 1.0)
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from ``4GiB``, ``512MB``, ``100k`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _NUMBER.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"invalid size {value!r}: use a number of bytes with an optional unit among "
                "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB (for example 4GiB)"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError(f"invalid size {value!r}: must not be negative")
    return size


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.50 KiB``; for tables and logs."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``0.0123`` -> ``12.3 ms``; for tables and logs."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
