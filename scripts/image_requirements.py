"""Print what the container image installs, one requirement a line: the build system's
requirements, the project's dependencies and those of the named extras (default: diagnostics).

Read from pyproject.toml, so that the Dockerfile's dependency layer (cached until pyproject.toml
changes) and ``make wheelhouse`` never drift from it. Standard library only: it runs in the bare
base image, before anything is installed.

    python scripts/image_requirements.py [--pyproject PATH] [EXTRA ...]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_EXTRAS = ("diagnostics",)
ROOT = Path(__file__).resolve().parent.parent


def requirements(pyproject: dict[str, Any], extras: Sequence[str]) -> list[str]:
    """The requirements, in order, without duplicates; ValueError names an unknown extra."""
    build, project = pyproject.get("build-system", {}), pyproject.get("project", {})
    found: list[str] = [*build.get("requires", []), *project.get("dependencies", [])]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            known = ", ".join(sorted(optional)) or "none"
            raise ValueError(f"pyproject.toml defines no extra {extra!r} (known: {known})")
        found.extend(optional[extra])
    return list(dict.fromkeys(found))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("extras", nargs="*", default=list(DEFAULT_EXTRAS), metavar="EXTRA")
    args = parser.parse_args(argv)
    with args.pyproject.open("rb") as file:
        pyproject = tomllib.load(file)
    try:
        lines = requirements(pyproject, args.extras)
    except ValueError as err:
        parser.error(str(err))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
