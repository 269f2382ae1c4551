"""The soak's memory probe (``amm.base.memdebug``): off by default, and when on it names the
structure that grows, which is what telling a leak from a high-water mark needs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from amm.base import memdebug


class Holder:
    def __init__(self) -> None:
        self.by_key: dict[str, int] = {}  # only str and int: a dict the collector untracks


def test_the_largest_containers_are_named_by_the_attribute_holding_them() -> None:
    holder = Holder()
    holder.by_key.update((f"k{i}", i) for i in range(50_000))
    line = memdebug.snapshot()
    assert {"owner": "Holder.by_key", "type": "dict", "len": 50_000} in line["containers"]
    assert line["rss"] > 0
    assert line["gc_objects"] > 0
    if platform.libc_ver()[0] == "glibc":
        assert line["malloc_in_use"] > 0
        assert "malloc_free" in line


def test_the_probe_is_off_unless_asked_for() -> None:
    env = {k: v for k, v in os.environ.items() if k != memdebug.ENV}
    code = "from amm.base import memdebug; print(memdebug.install_from_env())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip() == "False"


def test_a_process_asked_to_writes_lines_with_its_python_heap(tmp_path: Path) -> None:
    code = (
        "import time\n"
        "from amm.base import memdebug\n"
        "assert memdebug.install_from_env()\n"
        "kept = [bytes(1000) for _ in range(2000)]\n"
        "time.sleep(30)\n"
    )
    env = {**os.environ, memdebug.ENV: str(tmp_path), memdebug.EVERY_ENV: "0.2"}
    env[memdebug.TRIM_ENV] = "1"
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        path = tmp_path / f"{child.pid}.jsonl"
        deadline = time.monotonic() + 20
        lines: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            if path.exists():
                lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
                if len(lines) >= 2 and int(lines[-1]["traced"]) > 2_000_000:  # type: ignore[call-overload]
                    break
            time.sleep(0.1)
        assert len(lines) >= 2, "no probe lines"
        last = lines[-1]
        assert int(last["traced"]) > 2_000_000, "2,000 values of 1 kB are alive"  # type: ignore[call-overload]
        assert "rss_untrimmed" in last
        assert "sites" in last
    finally:
        child.kill()
        child.wait(timeout=10)
