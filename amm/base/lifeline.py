"""Children that stop when their launcher dies, however it dies.

``LocalCluster`` (and so ``amm cluster``) starts the AMM and the agents in sessions of their own,
so that a terminal's Ctrl-C reaches only the launcher, which stops them in order. A launcher that
dies without that clean-up (``kill -9``, a closed terminal, the OOM killer) would leave them all
running and holding their ports. So the launcher opens a pipe, keeps its write end and hands the
read end to each child (``AMM_LIFELINE_FD`` names the descriptor). The kernel closes the write end
when the launcher dies, the child reads end-of-file and stops as on SIGTERM.

Not ``prctl(PR_SET_PDEATHSIG)``: it is Linux-only, and it fires when the *thread* that started the
child exits, which would stop a cluster started from a worker thread that then returns. A
launcher's ``fork`` without ``exec`` shares the write end, and the children then outlive the
launcher until that fork exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

ENV = "AMM_LIFELINE_FD"


class Lifeline:
    """The launcher's side: a pipe whose read end children inherit (``child_env``, ``fds``)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()  # neither is inherited unless passed (PEP 446)

    @property
    def fds(self) -> tuple[int, ...]:
        """What ``subprocess.Popen(pass_fds=...)`` hands a child: the read end."""
        return (self._read,)

    def child_env(self) -> dict[str, str]:
        return {ENV: str(self._read)}

    def cut(self) -> None:
        """Close both ends: every child still holding the read end sees end-of-file; idempotent."""
        for fd in (self._write, self._read):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._write = self._read = -1


def watch(on_cut: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_cut`` on this loop once the launcher that passed ``AMM_LIFELINE_FD`` is gone;
    returns the function that stops watching. Without the variable (a process started by hand,
    by a container or by a test), nothing to watch."""
    value = os.environ.pop(ENV, None)  # not for our own children, which do not get the fd
    if value is None:
        return lambda: None
    try:
        fd = int(value)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        return lambda: None
    loop = asyncio.get_running_loop()
    watching = True

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end-of-file: every write end is closed, the launcher is gone
            stop()
            on_cut()

    def stop() -> None:
        nonlocal watching
        if not watching:  # closing twice could close a descriptor reused meanwhile
            return
        watching = False
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    loop.add_reader(fd, readable)
    return stop
