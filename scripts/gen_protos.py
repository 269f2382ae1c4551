"""Generate the Python code for the wire contract: the only writer of ``amm/v1/``.

``protos/amm/v1/*.proto`` is compiled with ``-I protos`` so that the generated modules import
each other as ``from amm.v1 import ...`` with no patching. ``--check`` regenerates into a
temporary folder and fails when the checked-in files differ, which is how CI keeps them honest.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("amm") / "v1"
INIT = '"""Generated from protos/amm/v1 by scripts/gen_protos.py. Do not edit."""\n'


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            sys.exit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
        return found
    return str(path)


def generate(out: Path) -> None:
    """Compile every proto of the package into ``out/amm/v1``."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    (out / PACKAGE / "__init__.py").write_text(INIT)
    (out / PACKAGE / "py.typed").write_text("")


def generated_files(base: Path) -> set[str]:
    return {p.name for p in (base / PACKAGE).iterdir() if p.is_file()}


def check() -> int:
    """Return 0 when the checked-in code equals a fresh generation, 1 otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want = generated_files(fresh)
        have = generated_files(ROOT) if (ROOT / PACKAGE).exists() else set()
        stale = sorted(
            name
            for name in want | have
            if name not in want
            or name not in have
            or not filecmp.cmp(fresh / PACKAGE / name, ROOT / PACKAGE / name, shallow=False)
        )
    if stale:
        print("generated protobuf code is out of date:", ", ".join(stale))
        print("run: python scripts/gen_protos.py")
        return 1
    print("generated protobuf code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if amm/v1 is out of date")
    args = parser.parse_args()
    if args.check:
        return check()
    target = ROOT / PACKAGE
    if target.exists():
        shutil.rmtree(target)
    generate(ROOT)
    print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
