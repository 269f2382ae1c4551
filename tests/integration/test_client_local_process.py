"""``LocalProcess`` and ``LocalCluster``'s start and stop paths, against real child processes.

Stand-in scripts print ready lines, die or hang the way a broken service or agent could, so the
start-up failure modes are covered whatever state the real service and agent are in. Where the
point is that nothing is left running after a failure, the real service and agents are started
and a subclass makes the failure happen at a chosen spawn.
"""

from __future__ import annotations

import _thread
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest

from amm.cluster import (
    AGENT_MODULE,
    AGENT_READY,
    SERVICE_READY,
    ClusterError,
    LocalCluster,
    LocalProcess,
)


def _process(script: str, name: str = "stand-in") -> LocalProcess:
    argv = [sys.executable, "-c", textwrap.dedent(script)]
    return LocalProcess(name, argv, AGENT_READY, dict(os.environ), echo=None)


def test_ready_line_gives_the_address_and_output_keeps_draining() -> None:
    process = _process(
        """
        import sys
        print("starting", flush=True)
        print("amm-agent ready address=127.0.0.1:4321", flush=True)
        for _ in range(2000):
            sys.stdout.write("x" * 200 + "\\n")
            sys.stderr.write("y" * 200 + "\\n")
        """
    )
    assert process.wait_ready(time.monotonic() + 10) == "127.0.0.1:4321"
    assert process.address == "127.0.0.1:4321"
    assert process.wait(10) == 0


class _BrokenPipe(io.StringIO):
    """An ``echo`` whose reader went away, as with ``amm cluster --logs | head -1``."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_failing_echo_stops_echoing_but_not_draining() -> None:
    script = """
        import sys
        for _ in range(2000):
            sys.stdout.write("x" * 200 + "\\n")
            sys.stderr.write("y" * 200 + "\\n")
        print("amm-agent ready address=127.0.0.1:4321", flush=True)
        for _ in range(2000):
            sys.stdout.write("x" * 200 + "\\n")
            sys.stderr.write("y" * 200 + "\\n")
        """
    argv = [sys.executable, "-c", textwrap.dedent(script)]
    process = LocalProcess("stand-in", argv, AGENT_READY, dict(os.environ), echo=_BrokenPipe())
    assert process.wait_ready(time.monotonic() + 10) == "127.0.0.1:4321"
    assert process.wait(10) == 0


def test_death_before_ready_reports_exit_code_and_stderr() -> None:
    process = _process(
        """
        import sys
        print("amm agent: error: cannot listen on 127.0.0.1:1", file=sys.stderr)
        sys.exit(2)
        """,
        name="worker-0",
    )
    with pytest.raises(ClusterError) as info:
        process.wait_ready(time.monotonic() + 10)
    message = str(info.value)
    assert "worker-0 exited with code 2" in message
    assert "cannot listen on 127.0.0.1:1" in message


def test_no_ready_line_in_time_kills_the_process() -> None:
    process = _process("import time; print('booting', flush=True); time.sleep(60)")
    with pytest.raises(ClusterError, match="printed no ready line in time"):
        process.wait_ready(time.monotonic() + 0.5)
    assert process.popen.returncode == -signal.SIGKILL


def test_wait_kills_a_process_that_ignores_sigterm() -> None:
    process = _process(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("amm-agent ready address=h:1", flush=True)
        time.sleep(60)
        """
    )
    process.wait_ready(time.monotonic() + 10)
    process.signal(signal.SIGTERM)
    assert process.wait(0.3) == -signal.SIGKILL


class _NoReaders(LocalProcess):
    """Interrupted right after its child is spawned, before its pipe readers start."""

    popens: ClassVar[list[subprocess.Popen[str]]] = []

    def _start_readers(self) -> None:
        self.popens.append(self.popen)
        raise KeyboardInterrupt


def test_interrupt_right_after_spawn_kills_the_child() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(KeyboardInterrupt):
        _NoReaders("stand-in", argv, AGENT_READY, dict(os.environ), echo=None)
    (popen,) = _NoReaders.popens
    try:
        assert popen.poll() == -signal.SIGKILL
        assert popen.stdout is not None
        assert popen.stdout.closed
        assert popen.stderr is not None
        assert popen.stderr.closed
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate()


class _FailingCluster(LocalCluster):
    """Raises ``failure`` instead of spawning its third agent; records what it did spawn."""

    def __init__(self, failure: BaseException, spawned: list[LocalProcess], **kwargs: Any) -> None:
        self._failure = failure
        self._spawned = spawned
        super().__init__(4, **kwargs)

    def _spawn(self, name: str, module: str, args: Sequence[str]) -> LocalProcess:
        if module == AGENT_MODULE and len(self._spawned) == 3:
            raise self._failure
        process = super()._spawn(name, module, args)
        self._spawned.append(process)
        return process


@pytest.mark.parametrize(
    "failure",
    [KeyboardInterrupt(), OSError(24, "Too many open files")],
    ids=["interrupt", "popen-fails"],
)
def test_failure_while_spawning_agents_stops_those_already_started(
    failure: BaseException,
) -> None:
    spawned: list[LocalProcess] = []
    try:
        with pytest.raises(type(failure)):
            _FailingCluster(failure, spawned)
        assert [p.name for p in spawned] == ["amm-service", "worker-0", "worker-1"]
        assert {p.name: p.popen.poll() is not None for p in spawned} == {
            "amm-service": True,
            "worker-0": True,
            "worker-1": True,
        }
    finally:
        for process in spawned:
            process.kill()


class _Lines(io.StringIO):
    """An ``echo`` that sets ``seen`` once a line containing ``marker`` is written."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.seen = threading.Event()

    def write(self, text: str) -> int:
        if self.marker in text:
            self.seen.set()
        return super().write(text)


class _StubbornService(LocalCluster):
    """A stand-in service that ignores SIGTERM (it says so) until SIGKILLed."""

    def _spawn(self, name: str, module: str, args: Sequence[str]) -> LocalProcess:
        script = """
            import signal, time
            signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
            print("amm-service ready address=127.0.0.1:1 epoch=1", flush=True)
            while True:
                time.sleep(1)
            """
        argv = [sys.executable, "-c", textwrap.dedent(script)]
        return LocalProcess(name, argv, SERVICE_READY, dict(os.environ), self._echo)


def test_interrupt_while_stopping_kills_what_is_left() -> None:
    echo = _Lines("ignoring SIGTERM")
    cluster = _StubbornService(0, stop_timeout=30, echo=echo)
    (service,) = cluster._service

    def interrupt_once_stopping() -> None:
        if echo.seen.wait(10):
            _thread.interrupt_main()

    interrupter = threading.Thread(target=interrupt_once_stopping)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.stop()
        assert cluster.exited() == {"amm-service": -signal.SIGKILL}
    finally:
        interrupter.join()
        service.kill()
