"""``amm cluster`` as real processes whose owner dies, hangs up or runs in the background.

The children (an AMM and agents) run in sessions of their own; they must not outlive a
``kill -9`` of their owner, a closed terminal must stop them cleanly, and ``amm cluster &`` in a
script, which starts with SIGINT ignored, must still stop on SIGINT.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import psutil

from tests.integration.test_cli_cluster import interrupt
from tests.support.waiting import poll_until


def start_cluster() -> tuple[subprocess.Popen[str], str]:
    """``amm cluster --workers 2`` once ready: the process and the AMM's address."""
    argv = [sys.executable, "-m", "amm", "cluster", "--workers", "2", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    return proc, next(line.split()[1] for line in lines if line.startswith("amm "))


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped (our container's init may not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def refuses(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def test_the_cluster_processes_stop_when_amm_cluster_is_killed() -> None:
    proc, address = start_cluster()
    children = [c.pid for c in psutil.Process(proc.pid).children()]
    try:
        assert len(children) == 3  # the AMM and two agents
        proc.kill()
        proc.communicate()
        poll_until(lambda: all(gone(pid) for pid in children), 20, "children exited")
        assert refuses(address)
    finally:
        for pid in children:
            if not gone(pid):
                psutil.Process(pid).kill()


def test_a_closed_terminal_stops_the_cluster_cleanly() -> None:
    proc, _ = start_cluster()
    children = [c.pid for c in psutil.Process(proc.pid).children()]
    try:
        interrupt(proc, signal.SIGHUP)
        assert all(gone(pid) for pid in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_cluster_started_in_the_background_of_a_script_stops_on_sigint() -> None:
    """Background jobs of a non-interactive shell start with SIGINT ignored (and so does
    ``make test > log &``, with every process its tests start)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc, _ = start_cluster()  # inherits SIGINT ignored
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        interrupt(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
