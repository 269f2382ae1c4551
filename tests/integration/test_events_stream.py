"""WatchEvents end to end: a follower sees the cluster act as it happens, resume points give only
newer events, gaps are reported, and ``amm events`` / ``amm top`` print what they should."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from amm import AsyncClient, Client
from amm.cli import main as cli_main
from amm.models import Event, EventGap
from amm_service.api.server import AmmServer
from tests.conftest import amm_config
from tests.support.processes import local_cluster
from tests.support.waiting import wait_for

DATA = b"e" * 1000


def kinds_of(seen: list[Event], worker: str | None = None) -> list[str]:
    return [e.kind for e in seen if worker is None or e.worker == worker]


async def test_a_follower_sees_forget_kill_and_unregister_as_they_happen() -> None:
    service_args = ["--stale-after", "400ms", "--dead-after", "1200ms"]
    with local_cluster(3, start=True, service_args=service_args) as cluster:
        async with AsyncClient(cluster.address, timeout=20) as client:
            w1, w2, w3 = await client.has_what()
            seen: list[Event] = []
            gaps: list[EventGap] = []

            async def follow() -> None:
                async for item in client.events(follow=True):
                    (gaps if isinstance(item, EventGap) else seen).append(item)  # type: ignore[arg-type]

            follower = asyncio.create_task(follow())
            try:
                await client.put("doomed", DATA, workers=[w1])
                await client.forget(["doomed"])
                forgotten = await wait_for(
                    lambda: [e for e in seen if e.kind == "keys-forgotten"],
                    within=20,
                    what="a keys-forgotten event",
                )
                assert forgotten[0].keys == ("doomed",)

                # A worker killed outright goes stale, then dead.
                await asyncio.to_thread(cluster.stop_worker, w2, signal.SIGKILL)
                await wait_for(
                    lambda: kinds_of(seen, w2),
                    lambda k: "worker-stale" in k and "worker-dead" in k,
                    within=30,
                    what="worker-stale and worker-dead of the killed worker",
                )
                # One stopped with SIGTERM drains (a retirement), then unregisters.
                await client.put("kept", DATA, workers=[w3])
                await asyncio.to_thread(cluster.stop_worker, w3, signal.SIGTERM)
                await wait_for(
                    lambda: kinds_of(seen, w3),
                    lambda k: "retired" in k and "worker-unregistered" in k,
                    within=30,
                    what="the SIGTERMed worker's retirement and unregistration",
                )
            finally:
                follower.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await follower
            assert gaps == []
            numbers = [e.seq for e in seen]
            assert numbers == sorted(set(numbers))
            assert kinds_of(seen, w2).index("worker-stale") < kinds_of(seen, w2).index(
                "worker-dead"
            )

            # Resuming from an event gives exactly the newer ones, as the follower saw them.
            middle = seen[len(seen) // 2]
            resumed = [e async for e in client.events(after=middle)]
            assert [e.seq for e in resumed if isinstance(e, Event)] == [
                e.seq for e in seen if e.seq > middle.seq
            ]
            assert not any(isinstance(e, EventGap) for e in resumed)
            # A resume point from another run of the AMM is reported, with what this run has.
            other_run = dataclasses.replace(middle, incarnation="an-earlier-run")
            first, *rest = [e async for e in client.events(after=other_run)]
            assert first == EventGap(missed=0, restarted=True)
            assert next(e.seq for e in rest if isinstance(e, Event)) == 1


async def test_a_resume_point_older_than_what_is_retained_gets_a_gap(tmp_path: Path) -> None:
    async with AmmServer(amm_config(tmp_path)) as amm, AsyncClient(amm.address) as client:
        assert amm.manager is not None
        log = amm.manager.events
        for i in range(1100):
            log.record("key-lost", f"test event {i}", keys=[f"k{i}"])
        newest = log.last_seq
        items = [item async for item in client.events(after=5)]
        gap, first = items[0], items[1]
        oldest = newest - 1000 + 1  # the AMM retains the most recent 1,000
        assert gap == EventGap(missed=oldest - 5 - 1)
        assert isinstance(first, Event)
        assert first.seq == oldest
        assert len(items) == 1 + 1000
        # With a kind filter: the gap still says what went, whatever its kind.
        only = [item async for item in client.events(after=5, kinds=["worker-dead"])]
        assert only == [EventGap(missed=oldest - 5 - 1)]

        # A follower that stops reading and leaves takes its place in the feed with it.
        feed = amm.manager.event_feed
        follower = client.events(after=newest - 1, follow=True)
        last = await anext(follower)
        assert isinstance(last, Event)
        assert last.seq == newest
        assert feed.watchers == 1
        await follower.aclose()
        await wait_for(lambda: feed.watchers, lambda n: n == 0, what="the follower's slot freed")


def test_amm_events_and_amm_top_once_print_what_happened(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with local_cluster(2, agent_args=["--memory-limit", "1GiB"]) as cluster:
        with Client(cluster.address, timeout=20) as client:
            w1, w2 = client.has_what()
            client.put("gone", DATA, workers=[w1])
            client.forget(["gone"])
            client.put("held", DATA, workers=[w2])
            client.workers(fresh=True)  # the AMM is stopped: its view, brought up to date
        addr = ["--amm", cluster.address]
        assert cli_main([*addr, "events"]) == 0
        lines = capsys.readouterr().out.splitlines()
        (line,) = [line for line in lines if "keys-forgotten" in line]
        assert "1 key(s) forgotten: 1 replica(s) deleted [gone]" in line
        assert "#" in line

        assert cli_main([*addr, "events", "--json", "--kind", "keys-forgotten"]) == 0
        out = capsys.readouterr().out.splitlines()
        (only,) = out
        assert '"kind": "keys-forgotten"' in only

        assert cli_main([*addr, "top", "--once"]) == 0
        frame = capsys.readouterr().out
        assert "\x1b" not in frame  # not a terminal: no escape codes
        assert f"amm top  {cluster.address}  stopped" in frame
        assert "workers 2 (0 stale, 0 retiring, 0 unreachable)" in frame
        assert "keys 1  replicas 1  lost keys 0" in frame
        rows = {w: line for line in frame.splitlines()[5:] for w in (w1, w2) if w in line}
        assert set(rows) == {w1, w2}
        assert "running" in rows[w2]
        assert "1.00 GiB" in rows[w2]
        assert "%" in rows[w2]  # a bar against its limit


def test_amm_events_follow_prints_new_events_and_ends_quietly_on_ctrl_c() -> None:
    with local_cluster(2) as cluster, Client(cluster.address, timeout=20) as client:
        w1, _ = client.has_what()
        client.put("first", DATA, workers=[w1])
        client.forget(["first"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        follower = subprocess.Popen(
            [sys.executable, "-m", "amm", "--amm", cluster.address, "events", "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert follower.stdout is not None
            # What the AMM retains comes first: once it is printed, the stream is open.
            assert "[first]" in _line_with(follower.stdout, "keys-forgotten")
            client.put("second", DATA, workers=[w1])
            client.forget(["second"])
            assert "[second]" in _line_with(follower.stdout, "keys-forgotten")
            follower.send_signal(signal.SIGINT)
            _, err = follower.communicate(timeout=20)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert follower.returncode == 0, err
        assert err == ""


def _line_with(stream: IO[str], word: str) -> str:
    """The next line of ``stream`` that holds ``word`` (the test's timeout bounds the wait)."""
    while True:
        line = stream.readline()
        assert line, f"the stream ended before a line with {word!r}"
        if word in line:
            return line
