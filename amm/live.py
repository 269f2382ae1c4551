"""``amm events`` and ``amm top``: the AMM followed live, in a terminal or through a pipe.

``amm events`` prints one line per event of the AMM's ``WatchEvents`` stream (JSON lines with
``--json``), and with ``--follow`` keeps printing them as the AMM records them. ``amm top``
redraws a view of the workers (a memory bar against each one's limit, status, keys, directives
of the last cycle) and a cluster header every interval. Both are plain text when stdout is not a
terminal: ``top`` then prints one frame per interval without escape codes (``--once``: one frame
and exit). Ctrl-C ends either quietly, exit code 0. The rendering functions are pure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from amm.base.units import format_bytes, format_duration, parse_duration
from amm.client import Client
from amm.errors import AmmError
from amm.models import Event, EventGap, Status, WorkerInfo
from amm.tables import render_table

EMPTY = "-"
KEYS_SHOWN = 5
BAR_WIDTH = 20
MIN_BAR_WIDTH = 5
#: Shortest interval ``amm top`` redraws at, in seconds.
MIN_INTERVAL = 0.1
_REPORTED = frozenset({"running", "paused", "closing", "unspecified"})
_TROUBLE = frozenset({"stale"})
_QUIET = frozenset({"paused", "closing", "retiring", "retired"})
#: ANSI: clear the screen and home the cursor; hide and show the cursor; colours; reset.
CLEAR, HIDE_CURSOR, SHOW_CURSOR = "\x1b[H\x1b[2J", "\x1b[?25l", "\x1b[?25h"
RED, YELLOW, BOLD, RESET = "\x1b[31m", "\x1b[33m", "\x1b[1m", "\x1b[0m"


# -- events -----------------------------------------------------------------------------------


def _keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:KEYS_SHOWN])
    return shown + (f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else "")


def render_event(event: Event) -> str:
    """One line: local time, seq, kind, worker, message and the first keys concerned."""
    when = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if event.at else EMPTY
    worker = f" {event.worker}" if event.worker else ""
    keys = f" [{_keys(event.keys)}]" if event.keys else ""
    return f"{when}  #{event.seq}  {event.kind}{worker}: {event.message}{keys}"


def render_gap(gap: EventGap) -> str:
    """The line standing for events that will never come."""
    if gap.restarted:
        return (
            f"-- the AMM restarted since that event: what it recorded after it is gone; "
            f"{gap.missed} event(s) of this run are no longer retained --"
        )
    return f"-- {gap.missed} event(s) missed: no longer retained, or this reader fell behind --"


def event_json(item: Event | EventGap) -> str:
    """One line of JSON: the event's fields, or ``{"gap": {"missed": N, "restarted": B}}``."""
    if isinstance(item, EventGap):
        return json.dumps({"gap": dataclasses.asdict(item)})
    fields = dataclasses.asdict(item)
    fields["at"] = item.at.isoformat() if item.at else None
    return json.dumps(fields)


def run_events(client: Client, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``amm events``: print the retained events after ``--after``, then with ``--follow``
    every new one as it comes, until Ctrl-C."""
    out = out or sys.stdout
    stream = client.events(
        args.after, kinds=args.kinds, follow=args.follow, incarnation=args.incarnation
    )
    try:
        for item in stream:
            if args.json:
                line = event_json(item)
            else:
                line = render_gap(item) if isinstance(item, EventGap) else render_event(item)
            print(line, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return 0


# -- top --------------------------------------------------------------------------------------


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#####...............]``: ``fraction`` (clamped to 0..1) of ``width`` filled."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def worker_state(w: WorkerInfo) -> tuple[str, str]:
    """The status shown and its mark: ``!`` for trouble (stale, unreachable, unconfirmed), ``~``
    for a worker that takes no new data (paused, closing, retiring, retired), else blank."""
    if w.unconfirmed:
        return "unconfirmed", "!"
    if w.missed_polls and w.status in _REPORTED:
        return f"unreachable ({w.missed_polls})", "!"
    if w.status in _TROUBLE:
        return f"{w.status} ({w.missed_polls} missed)" if w.missed_polls else w.status, "!"
    return w.status, "~" if w.status in _QUIET else " "


def _directives(status: Status) -> dict[str, tuple[int, int]]:
    """Replicas each worker was told to make and to drop in the last cycle."""
    counts: dict[str, tuple[int, int]] = {}
    last = status.last_cycle
    if last is None or last.dry_run:
        return counts
    for d in last.directives:
        copies, drops = counts.get(d.worker, (0, 0))
        if d.op == "replicate":
            copies += 1
        elif d.op == "drop":
            drops += 1
        counts[d.worker] = (copies, drops)
    return counts


def _paint(text: str, colour: str, on: bool) -> str:
    return f"{colour}{text}{RESET}" if on and colour else text


def render_top(
    address: str,
    status: Status,
    workers: Sequence[WorkerInfo],
    *,
    now: datetime | None = None,
    colour: bool = False,
    width: int = 0,
) -> str:
    """One frame: a header about the AMM and the cluster, then one row per worker. Bars show
    memory (by the AMM's measure) against each worker's limit, or against the largest worker's
    memory when it has none. ``width`` > 0 cuts lines to it."""
    now = now or datetime.now(UTC)
    t = status.totals
    state = "running" if status.running else "stopped"
    header = [
        _paint(
            f"amm top  {address}  {state}  every {format_duration(status.interval)}  "
            f"epoch {status.epoch}  cycles {status.cycles}  "
            f"{now.astimezone():%H:%M:%S}",
            BOLD,
            colour,
        ),
        f"workers {t.workers} ({t.stale_workers} stale, {t.retiring_workers} retiring, "
        f"{t.unreachable_workers} unreachable)  memory {format_bytes(t.memory_bytes)}",
        f"keys {t.keys}  replicas {t.replicas}  lost keys {t.lost_keys}  "
        f"below goal {t.keys_below_goal}",
    ]
    last = status.last_cycle
    if last is None:
        header.append(f"no cycle yet  in flight {t.directives_in_flight}")
    else:
        header.append(
            f"last cycle {last.number}: {last.directives_sent} directives ({last.applied} "
            f"applied, {last.refused} refused, {last.failed} failed), "
            f"{format_duration(last.duration)}  in flight {t.directives_in_flight}"
        )
    if status.startup_grace:
        header.append("drops held back: start-up grace")
    largest = max((w.memory_bytes for w in workers), default=0)
    directives = _directives(status)
    bar_width = BAR_WIDTH
    lines = _worker_lines(workers, directives, largest, bar_width)
    widest = max(len(line) for line in lines)
    if 0 < width < widest:  # a narrow terminal: narrower bars before anything is cut
        bar_width = max(MIN_BAR_WIDTH, bar_width - (widest - width))
        lines = _worker_lines(workers, directives, largest, bar_width)
    if workers:
        colours = {"!": RED, "~": YELLOW}
        lines[1:] = [
            _paint(line, colours.get(worker_state(w)[1], ""), colour)
            for line, w in zip(lines[1:], workers, strict=True)
        ]
    notes = []
    if any(not w.limit_bytes for w in workers):
        notes.append("bars without a percentage: against the largest worker (no memory limit)")
    frame = [*header, "", *lines, *notes]
    if width > 0:
        frame = [_cut(line, width) for line in frame]
    return "\n".join(frame)


def _worker_lines(
    workers: Sequence[WorkerInfo],
    directives: dict[str, tuple[int, int]],
    largest: int,
    bar_width: int,
) -> list[str]:
    """The workers' table, uncoloured: header line first."""
    if not workers:
        return ["no workers"]
    rows = []
    for w in workers:
        shown, mark = worker_state(w)
        limit = w.limit_bytes
        fraction = w.memory_bytes / limit if limit else w.memory_bytes / max(1, largest)
        copies, drops = directives.get(w.address, (0, 0))
        rows.append(
            (
                mark,
                w.name or w.address,
                w.address,
                shown,
                bar(fraction, bar_width) + (f" {fraction:4.0%}" if limit else ""),
                format_bytes(w.memory_bytes),
                format_bytes(limit) if limit else EMPTY,
                w.key_count,
                format_bytes(w.managed_bytes),
                f"+{copies} -{drops}" if copies or drops else EMPTY,
            )
        )
    headers = ("", "NAME", "ADDRESS", "STATUS", "MEMORY", "USED", "LIMIT", "KEYS", "MANAGED")
    return render_table((*headers, "LAST CYCLE"), rows, right=(5, 6, 7, 8)).split("\n")


def _cut(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters; a cut line loses its colour."""
    visible = _visible(line)
    return line if len(visible) <= width else visible[:width]


def _visible(line: str) -> str:
    for code in (RED, YELLOW, BOLD, RESET):
        line = line.replace(code, "")
    return line


def _interval(args: argparse.Namespace, status: Status) -> float:
    if args.interval is None:
        return max(MIN_INTERVAL, status.interval)
    return max(MIN_INTERVAL, parse_duration(args.interval))


def run_top(client: Client, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``amm top``: a frame every interval (the AMM's own unless ``--interval``), redrawn in
    place on a terminal, printed one after another elsewhere; ``--once`` prints one and exits.
    A failed refresh shows its error in place of the frame and is tried again next interval,
    except with ``--once``."""
    out = out or sys.stdout
    tty = out.isatty()
    colour = tty and not os.environ.get("NO_COLOR")
    if tty and not args.once:
        out.write(HIDE_CURSOR)
    try:
        interval = MIN_INTERVAL
        while True:
            try:
                status = client.status()
                workers = client.workers()
            except AmmError as err:
                if args.once or not tty:
                    raise
                frame = f"amm top  {client.address}: {err.status.name}: {err.message}"
            else:
                interval = _interval(args, status)
                width = shutil.get_terminal_size().columns if tty else 0
                frame = render_top(client.address, status, workers, colour=colour, width=width)
            if tty and not args.once:
                out.write(CLEAR + frame + "\n")
            else:
                out.write(frame + "\n")
            out.flush()
            if args.once:
                return 0
            if not tty:
                out.write("\n")
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if tty and not args.once:
            out.write(SHOW_CURSOR)
            out.flush()
