"""A real headless browser for the dashboard's tests: Debian's chromium, run once per page.

``--dump-dom`` prints the page's DOM once its scripts ran (``--virtual-time-budget`` lets its
timers and fetches run that long in virtual time, so the page polls a few times without the test
waiting for real), and ``--screenshot`` writes a PNG the same way. No driver and no Python
package: one process per look, a couple of seconds each.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

#: Chromium as the README's CI installs it (``apt-get install -y chromium``), or another name.
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
)
#: A run of chromium may take this long on a loaded machine, in seconds.
TIMEOUT = 120.0


def chromium() -> str | None:
    """The browser's path, or None when none is installed."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _run(url: str, *extra: str, budget_ms: int) -> str:
    browser = chromium()
    if browser is None:
        raise RuntimeError("no chromium installed")
    with tempfile.TemporaryDirectory(prefix="amm-chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, *, budget_ms: int = 3000) -> str:
    """The page's DOM after ``budget_ms`` of virtual time."""
    return _run(url, "--dump-dom", budget_ms=budget_ms)


def screenshot(
    url: str, path: Path, *, width: int = 1280, height: int = 1100, budget_ms: int = 3000
) -> None:
    """A PNG of the page at ``path`` after ``budget_ms`` of virtual time."""
    _run(url, f"--screenshot={path}", f"--window-size={width},{height}", budget_ms=budget_ms)
