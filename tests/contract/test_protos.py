"""The wire contract: generated code is current and imports cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_import_each_other_without_patching() -> None:
    from amm.v1 import agent_pb2, control_pb2, types_pb2

    assert agent_pb2.DESCRIPTOR.package == "amm.v1"
    assert control_pb2.DESCRIPTOR.services_by_name["ActiveMemoryManager"].full_name == (
        "amm.v1.ActiveMemoryManager"
    )
    assert agent_pb2.DESCRIPTOR.services_by_name["WorkerAgent"].full_name == "amm.v1.WorkerAgent"
    assert types_pb2.DESCRIPTOR.name == "amm/v1/types.proto"
