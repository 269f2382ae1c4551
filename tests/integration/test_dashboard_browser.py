"""The dashboard in a real headless browser (chromium) while a small cluster runs: the page
loads, its charts render, and the figures it shows are those ``GetStatus`` answers. Skipped,
with the reason, where no chromium is installed (``apt-get install -y chromium``)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from amm import Client
from amm.cluster import LocalCluster
from amm.v1 import control_pb2, control_pb2_grpc
from tests.support import browser
from tests.support.waiting import poll_until

pytestmark = pytest.mark.skipif(
    browser.chromium() is None, reason="no chromium to drive (apt-get install -y chromium)"
)

KEYS = [f"k{i}" for i in range(12)]
VALUE = b"x" * 50_000
#: The figures of the page and the GetStatus totals they show, once the cluster settled.
SETTLED_FIGURES = {
    "workers": "workers",
    "keys": "keys",
    "replicas": "replicas",
    "managed": "managed_bytes",
    "in-flight": "directives_in_flight",
    "with-goal": "keys_with_goal",
    "below-goal": "keys_below_goal",
    "lost": "lost_keys",
}


def get_status(address: str) -> control_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        stub = control_pb2_grpc.ActiveMemoryManagerStub(channel)
        response: control_pb2.GetStatusResponse = stub.GetStatus(
            control_pb2.GetStatusRequest(), timeout=10
        )
        return response


def stopped_samples(url: str) -> list[dict[str, object]]:
    """The dashboard's samples taken while the AMM was stopped."""
    with urllib.request.urlopen(url + "api/history?after=0", timeout=10) as response:
        samples: list[dict[str, object]] = json.load(response)["samples"]
    return [s for s in samples if s["running"] is False]


def figures(dom: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r'id="stat-([a-z-]+)" data-value="(\d+)"', dom)}


def test_the_page_shows_the_live_cluster_as_getstatus_does(tmp_path: Path) -> None:
    with LocalCluster(2, interval="500ms", start=False, dashboard="127.0.0.1:0") as cluster:
        assert cluster.dashboard is not None
        url = f"http://{cluster.dashboard}/"
        w0, _w1 = cluster.workers
        with Client(cluster.address) as client:
            for key in KEYS:
                client.put(key, VALUE, w0)
            # The AMM off for a while first: its memory is sampled, and the page shades it.
            poll_until(
                lambda: len(stopped_samples(url)) >= 2, within=30, what="samples of the AMM off"
            )
            client.amm.start()
            client.replicate(KEYS, n=2)

        def settled() -> control_pb2.GetStatusResponse | None:
            status = get_status(cluster.address)
            t = status.totals
            done = t.replicas == 2 * len(KEYS) and t.directives_in_flight == 0
            return status if done and t.keys_below_goal == 0 else None

        before = poll_until(settled, within=60, what="every key on both workers")
        dom = browser.dump_dom(url)
        after = get_status(cluster.address)

        assert 'data-state="live"' in dom, dom[:2000]
        shown = figures(dom)
        for figure, total in SETTLED_FIGURES.items():
            assert shown[figure] == getattr(after.totals, total), figure
        assert shown["epoch"] == after.epoch
        assert before.cycles <= shown["cycles"] <= after.cycles
        # The worker table comes from the history, the totals from GetStatus: they agree.
        rows = re.findall(r'<tr data-worker="([^"]+)" data-status="([a-z]+)">', dom)
        assert sorted(rows) == [("worker-0", "running"), ("worker-1", "running")]
        managed = re.findall(r'class="num managed" data-value="(\d+)"', dom)
        assert sum(map(int, managed)) == after.totals.managed_bytes == 2 * len(KEYS) * len(VALUE)
        # The charts: both workers' layers (managed and the rest) and this replication's bars.
        layers = set(re.findall(r'data-worker="([^"]+)" data-part="([a-z]+)"', dom))
        assert {(w, p) for w in ("worker-0", "worker-1") for p in ("managed", "unmanaged")} <= (
            layers
        )
        assert 'class="replicated"' in dom
        assert 'class="amm-off"' in dom, "the AMM-off period is shaded"

        png = tmp_path / "dashboard.png"
        browser.screenshot(url, png)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 20_000
