"""The announcement's picture for amm: cluster memory over time, AMM off against AMM on.

Two panels, managed and process memory, each with one line per run, aligned on the run's start
(``MemorySampler.plot(align=True)``). Rendered off-screen (matplotlib's Agg backend), since the
replay command only writes a file. Needs the ``diagnostics`` extra.
"""

from __future__ import annotations

from pathlib import Path

from amm.diagnostics import MemorySampler, require_extra


def write_figure(
    managed: MemorySampler, process: MemorySampler, path: str | Path, title: str
) -> Path:
    """Draw both samplers' series side by side and save them as an image at ``path``."""
    matplotlib = require_extra("matplotlib", "plot")
    require_extra("pandas", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        managed.plot(align=True, grid=True, ax=left, title="managed memory (bytes of keys held)")
        process.plot(align=True, grid=True, ax=right, title="process memory (agents' RSS)")
        for axes in (left, right):
            axes.set_ylim(bottom=0)
        figure.suptitle(title)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path
