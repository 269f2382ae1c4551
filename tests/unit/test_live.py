"""``amm top`` frames and ``amm events`` lines, rendered from values (no server)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from amm.live import (
    RED,
    RESET,
    YELLOW,
    bar,
    event_json,
    render_event,
    render_gap,
    render_top,
    worker_state,
)
from amm.models import DirectiveRecord, Event, EventGap, WorkerInfo
from tests.unit.test_client_tables import _cycle, _status, _worker

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MiB = 1024**2


def _directive(op: str, worker: str) -> DirectiveRecord:
    return DirectiveRecord(
        id="d",
        op=op,
        key="k",
        worker=worker,
        policy="p",
        outcome="applied",
        reason=None,
        message="",
        sent_at=None,
        timed_out=False,
    )


def _w(address: str, **changes: Any) -> WorkerInfo:
    return _worker(address, name=address.split(":")[0][-1], **changes)


def test_bars_fill_against_the_limit_or_else_the_largest_worker() -> None:
    assert bar(0.5, width=10) == "[#####.....]"
    assert bar(3.0, width=4) == "[####]"  # over the limit: full, the percentage says by how much
    assert bar(-1, width=2) == "[..]"
    workers = [
        _w("10.0.0.1:1", memory_bytes=50 * MiB, limit_bytes=100 * MiB),
        _w("10.0.0.2:1", memory_bytes=40 * MiB),
        _w("10.0.0.3:1", memory_bytes=10 * MiB),
    ]
    frame = render_top("amm:1", _status(), workers, now=NOW)
    lines = {w.address: next(x for x in frame.splitlines() if w.address in x) for w in workers}
    assert "[##########..........]  50%" in lines["10.0.0.1:1"]
    assert "[################....]" in lines["10.0.0.2:1"]  # 40 of the largest, 50
    assert "%" not in lines["10.0.0.2:1"]
    assert "[####................]" in lines["10.0.0.3:1"]
    assert "against the largest worker" in frame


def test_the_header_sums_up_the_cluster_and_the_last_cycle() -> None:
    cycle = _cycle(
        directives=(_directive("replicate", "10.0.0.1:1"), _directive("drop", "10.0.0.2:1")),
        directives_sent=2,
        applied=2,
    )
    status = dataclasses.replace(
        _status(running=True, cycles=3, lost_keys=4, stale_workers=1),
        last_cycle=cycle,
    )
    workers = [_w("10.0.0.1:1"), _w("10.0.0.2:1")]
    frame = render_top("amm:1", status, workers, now=NOW)
    header = frame.splitlines()[:4]
    assert header[0].startswith("amm top  amm:1  running  every 2.00 s  epoch 1  cycles 3")
    assert header[1].startswith("workers 2 (1 stale, 0 retiring, 0 unreachable)  memory")
    assert header[2] == "keys 1  replicas 2  lost keys 4  below goal 0"
    assert header[3].startswith("last cycle 3: 2 directives (2 applied, 0 refused, 0 failed)")
    one, two = (next(x for x in frame.splitlines() if w.address in x) for w in workers)
    assert one.endswith("+1 -0")
    assert two.endswith("+0 -1")


def test_workers_in_trouble_or_out_of_service_are_marked_and_coloured() -> None:
    assert worker_state(_w("a:1", status="stale", missed_polls=4)) == ("stale (4 missed)", "!")
    assert worker_state(_w("a:1", missed_polls=2)) == ("unreachable (2)", "!")
    assert worker_state(_w("a:1", unconfirmed=True)) == ("unconfirmed", "!")
    assert worker_state(_w("a:1", status="paused")) == ("paused", "~")
    assert worker_state(_w("a:1", status="retiring")) == ("retiring", "~")
    assert worker_state(_w("a:1")) == ("running", " ")
    workers = [
        _w("10.0.0.1:1", status="stale"),
        _w("10.0.0.2:1", status="paused"),
        _w("10.0.0.3:1"),
    ]
    plain = render_top("amm:1", _status(), workers, now=NOW)
    assert "\x1b" not in plain
    coloured = render_top("amm:1", _status(), workers, now=NOW, colour=True)
    lines = coloured.splitlines()
    stale = next(x for x in lines if "10.0.0.1:1" in x)
    paused = next(x for x in lines if "10.0.0.2:1" in x)
    running = next(x for x in lines if "10.0.0.3:1" in x)
    assert stale.startswith(RED + "!")
    assert stale.endswith(RESET)
    assert paused.startswith(YELLOW + "~")
    assert "\x1b" not in running
    narrow = render_top("amm:1", _status(), workers, now=NOW, width=80)
    assert all(len(line) <= 80 for line in narrow.splitlines())
    row = next(x for x in narrow.splitlines() if "10.0.0.3:1" in x)
    assert row.endswith("  3  1.50 KiB  -")  # the bars narrowed; no column was cut


def test_no_workers_is_said() -> None:
    assert "no workers" in render_top("amm:1", _status(workers=0), [], now=NOW)


def test_event_lines_and_json() -> None:
    event = Event(
        at=NOW,
        kind="key-lost",
        worker="10.0.0.1:1",
        keys=tuple(f"k{i}" for i in range(7)),
        message="2 key(s) had no copy left",
        seq=12,
        incarnation="abc",
    )
    line = render_event(event)
    assert (
        "  #12  key-lost 10.0.0.1:1: 2 key(s) had no copy left [k0, k1, k2, k3, k4 and 2 more]"
        in line
    )
    fields = json.loads(event_json(event))
    assert fields["seq"] == 12
    assert fields["incarnation"] == "abc"
    assert fields["at"] == "2026-01-01T12:00:00+00:00"
    assert json.loads(event_json(EventGap(3))) == {"gap": {"missed": 3, "restarted": False}}
    assert "3 event(s) missed" in render_gap(EventGap(3))
    assert "restarted" in render_gap(EventGap(0, restarted=True))
