"""``MemorySampler.to_pandas`` and ``plot`` on samples made here (the ``diagnostics`` extra)."""

from __future__ import annotations

import sys

import pytest

from amm.diagnostics import MemorySampler


def sampler() -> MemorySampler:
    ms = MemorySampler()
    ms.samples["AMM off"] = [(1000.0, 10), (1000.5, 30), (1001.0, 20)]
    ms.samples["AMM on"] = [(2000.0, 10), (2000.5, 15), (2001.0, 12), (2001.5, 11)]
    ms._intervals.update({"AMM off": 0.5, "AMM on": 0.5})
    return ms


def test_to_pandas_aligned_series_start_together() -> None:
    pytest.importorskip("pandas", reason="the diagnostics extra (pandas) is not installed")
    frame = sampler().to_pandas(align=True)
    assert list(frame.columns) == ["AMM off", "AMM on"]
    assert [t.total_seconds() for t in frame.index] == [0.0, 0.5, 1.0, 1.5]
    assert frame["AMM off"].tolist()[:3] == [10, 30, 20]
    # A series is not extended beyond its last sample.
    assert frame["AMM off"].isna().tolist() == [False, False, False, True]
    assert frame["AMM on"].max() == 15


def test_to_pandas_unaligned_keeps_absolute_times() -> None:
    pytest.importorskip("pandas", reason="the diagnostics extra (pandas) is not installed")
    frame = sampler().to_pandas()
    assert len(frame) == 7
    assert frame.index[0].timestamp() == 1000.0


def test_plot_draws_one_line_per_label_in_gib() -> None:
    pytest.importorskip("pandas", reason="the diagnostics extra (pandas) is not installed")
    matplotlib = pytest.importorskip(
        "matplotlib", reason="the diagnostics extra (matplotlib) is not installed"
    )
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = sampler().plot(align=True, grid=True)
    try:
        assert axes.get_ylabel() == "Cluster memory (GiB)"
        assert axes.get_xlabel() == "time (s)"
        assert [line.get_label() for line in axes.get_lines()] == ["AMM off", "AMM on"]
        assert max(axes.get_lines()[0].get_ydata()) == pytest.approx(30 / 2**30)
    finally:
        plt.close("all")


def test_a_missing_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'amm\[diagnostics\]'"):
        sampler().to_pandas()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"MemorySampler\.plot needs matplotlib"):
        sampler().plot()
