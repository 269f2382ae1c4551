"""The blocking client's private loop under Ctrl-C (``amm.blocking.LoopThread``)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from amm.blocking import LoopThread


@pytest.fixture
def portal() -> Iterator[LoopThread]:
    portal = LoopThread()
    yield portal
    portal.close(_nothing)


async def _nothing() -> None:
    pass


def test_a_call_interrupted_by_ctrl_c_has_ended_when_it_raises(portal: LoopThread) -> None:
    """Else the loop is stopped at exit with the call's task still unwinding ("Task was
    destroyed but it is pending!" on stderr after ``amm events --follow`` and Ctrl-C)."""
    unwound = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # unwinding takes turns of the loop
            unwound.set()

    main = threading.main_thread().ident
    assert main is not None
    threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        portal.call(slow)
    assert unwound.is_set()


def test_ctrl_c_handed_to_another_thread_still_interrupts_the_wait(portal: LoopThread) -> None:
    """A signal may be delivered to any thread of the process (gRPC's own, say); the main
    thread, waiting on a lock without a timeout, never saw it until the call ended."""

    async def slow() -> None:
        await asyncio.sleep(5)

    timer = threading.Timer(0.2, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        portal.call(slow)
    assert time.monotonic() - started < 2.0


class _InterruptedInTheLock(Future[None]):
    """A future whose wait is cut by Ctrl-C as ``threading.Condition`` lets go of its lock:
    CPython then raises the failed release with the interrupt as its context. The race itself
    cannot be provoked at will (a signal between two bytecodes of ``Condition.wait``)."""

    def result(self, timeout: float | None = None) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904 - as CPython


def test_ctrl_c_that_lands_inside_the_futures_lock_is_still_a_ctrl_c(portal: LoopThread) -> None:
    with pytest.raises(KeyboardInterrupt):
        portal._wait(_InterruptedInTheLock(), None)


def test_other_runtime_errors_of_a_wait_are_not_taken_for_ctrl_c(portal: LoopThread) -> None:
    class Broken(Future[None]):
        def result(self, timeout: float | None = None) -> None:
            raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        portal._wait(Broken(), None)
