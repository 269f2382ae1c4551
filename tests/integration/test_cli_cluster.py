"""``amm cluster`` and the example as a user runs them: real processes, stopped by signals."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from amm import example
from amm.client import Client


def cluster_command(*args: str) -> tuple[subprocess.Popen[str], str]:
    """``amm cluster ARGS`` as a user runs it, once ready: the process and the AMM's address."""
    argv = [sys.executable, "-m", "amm", "cluster", "--listen", "127.0.0.1:0", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    return proc, next(line.split()[1] for line in lines if line.startswith("amm "))


def interrupt(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGINT) -> None:
    """Stop it as Ctrl-C (or ``sig``) does; it must exit 0 saying so."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "cluster stopped" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cluster_command_stops_everything_on_signal(sig: signal.Signals) -> None:
    proc, address = cluster_command("--workers", "1")
    try:
        with Client(address, timeout=5) as client:
            assert len(client.has_what()) == 1
        interrupt(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_example_runs_to_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert example.main(listen="127.0.0.1:0") == 0
    out = capsys.readouterr().out
    assert '>>> client.get("x", worker=w2)' in out
    assert "b'payload'" in out
    assert "Cluster stopped" in out


def test_a_worker_retired_and_closed_leaves_the_cluster_command_running() -> None:
    """``amm retire`` closes the retired agent, which exits cleanly: the AMM and the other
    workers (and what they hold) stay up. Only a crash stops the whole cluster."""
    proc, address = cluster_command("--workers", "2", "--interval", "50ms", "--start")
    try:
        assert proc.stderr is not None
        with Client(address, timeout=10) as client:
            leaving, staying = client.workers()
            client.put("k", b"kept", workers=[leaving.address])
            (result,) = client.retire_workers(leaving.address)
            assert (result.retired, result.closed) == (True, True), result.reason
            # Its next line tells what it made of the exit; at EOF it had stopped everything.
            noticed = proc.stderr.readline()
            assert noticed == f"{leaving.name} exited cleanly and left the cluster\n"
            assert proc.poll() is None
            assert client.get("k") == b"kept"
            assert [w.address for w in client.workers()] == [staying.address]
        interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
