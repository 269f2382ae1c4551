"""The ``amm`` control verbs against the in-process fakes (tests/support/fakes.py).

Checks what the CLI owns: output shapes, ``--json``, files in and out, and that every failure is
one ``error: STATUS: message`` line on stderr with exit code 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from amm.cli import main
from amm.models import sort_addresses
from tests.support.fakes import FakeCluster


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    with FakeCluster(2) as cluster:
        yield cluster


def test_put_from_file_and_get_to_file(
    fake: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w1, w2 = sort_addresses(fake.workers)
    source, target = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(bytes(range(256)))
    assert main(["--amm", fake.address, "put", "k", "--file", str(source), "--worker", w1]) == 0
    assert capsys.readouterr().out == f"stored 'k' (256 B) on {w1}\n"
    assert main(["--amm", fake.address, "get", "k", "--worker", w2, "-o", str(target)]) == 0
    assert target.read_bytes() == bytes(range(256))
    assert main(["--amm", fake.address, "has-what", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {w1: ["k"], w2: ["k"]}


def test_tables_and_json(fake: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    w1, w2 = sort_addresses(fake.workers)
    assert main(["--amm", fake.address, "put", "k", "--value", "v", "--worker", w2]) == 0
    capsys.readouterr()
    assert main(["--amm", fake.address, "has-what"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"WORKER{' ' * (len(w1) - 4)}KEYS",
        f"{w1}  -",
        f"{w2}  k",
    ]
    assert main(["--amm", fake.address, "running", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"running": False}
    assert main(["--amm", fake.address, "start"]) == 0
    assert main(["--amm", fake.address, "running"]) == 0
    assert capsys.readouterr().out.splitlines() == ["AMM started", "running"]
    assert main(["--amm", fake.address, "run-once", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["number"] == 1


def test_errors_are_one_line_and_exit_1(
    fake: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--amm", fake.address, "who-has", "missing"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: unknown key 'missing'\n"
    assert main(["--amm", fake.address, "put", "k", "--file", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")
    assert main(["--amm", "127.0.0.1:1", "--timeout", "5", "status"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: the AMM at 127.0.0.1:1: ")
