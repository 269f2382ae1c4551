"""Blocking facades over asyncio objects: a private event loop in a thread, and method forwarding.

``Client`` is an ``AsyncClient`` driven from synchronous code. Rather than write each method
twice, ``forward`` turns an async method into a blocking one with the same signature (checked by
mypy through ``ParamSpec``) that runs the coroutine on a ``LoopThread`` and waits for it. Every
``grpc.aio`` object is created and used on that one loop. Nothing here knows about amm's RPCs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import grpc

from amm.errors import AmmError

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")

#: Seconds to wait for coroutines to end once cancelled, or once the channels are closed.
SETTLE = 2.0
#: Seconds between two checks for a signal while a call is waited on.
WAKE_EVERY = 0.2


class LoopThread:
    """A private event loop running in a daemon thread; ``call`` blocks on one coroutine.

    Nothing is left half done on the loop, whenever Ctrl-C comes: a coroutine is made on the
    loop's thread (none made here can go unawaited), an interrupted call has ended its
    cancellation when ``call`` raises, and ``close`` lets what is left end (the channels
    closed) before it stops the loop. Stopped with tasks pending, the loop left "Task was
    destroyed but it is pending!" or "coroutine ... was never awaited" on stderr at exit
    (``amm events --follow`` ended with Ctrl-C)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="amm-client-loop", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False
        #: Tasks begun by ``call`` that have not ended (used on the loop's thread only).
        self._tasks: set[asyncio.Task[Any]] = set()

    def call(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``fn(*args, **kwargs)`` run on the loop, waited for; cancelled if the wait is
        interrupted."""
        with self._lock:
            if self._closed:
                raise AmmError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
            future = self._submit(functools.partial(fn, *args, **kwargs))
        return self._wait(future, None)

    def _submit(self, make: Callable[[], Coroutine[Any, Any, T]]) -> Future[T]:
        future: Future[T] = Future()
        self._loop.call_soon_threadsafe(self._begin, make, future)
        return future

    def _wait(self, future: Future[T], timeout: float | None) -> T:
        waited = 0.0
        try:
            while True:
                # In short waits: a Ctrl-C handed to one of gRPC's threads, not this one, does
                # not wake a wait without a timeout, and the call went on for good.
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    return future.result(WAKE_EVERY)
                waited += WAKE_EVERY
                if timeout is not None and waited >= timeout:
                    raise TimeoutError
        except BaseException as err:
            if future.cancel():
                self._settle()
            interrupt = err.__context__
            if isinstance(err, RuntimeError) and isinstance(interrupt, KeyboardInterrupt):
                # The Ctrl-C landed while ``Future.result`` let go of its condition's lock,
                # whose release then failed ("cannot release un-acquired lock"): it is the
                # Ctrl-C that the caller must see (``amm events --follow`` exited 1 with a
                # traceback, once in CI).
                raise interrupt from None
            raise

    def _begin(self, make: Callable[[], Coroutine[Any, Any, T]], future: Future[T]) -> None:
        """On the loop: run ``make()`` as a task whose end settles ``future``, unless
        ``future`` was cancelled already; cancelling ``future`` cancels the task."""
        if future.cancelled():
            return
        task = self._loop.create_task(make())
        self._tasks.add(task)

        def ended(task: asyncio.Task[T]) -> None:
            self._tasks.discard(task)
            if not future.set_running_or_notify_cancel():
                return
            if task.cancelled():
                future.set_exception(concurrent.futures.CancelledError())
            elif (error := task.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(task.result())

        task.add_done_callback(ended)
        future.add_done_callback(
            lambda f: f.cancelled() and self._loop.call_soon_threadsafe(task.cancel)
        )

    def _settle(self) -> None:
        """Wait, ``SETTLE`` seconds at most, until the tasks ``call`` began have ended."""
        with contextlib.suppress(Exception):
            self._wait(self._submit(self._ended), SETTLE + 1)

    async def _ended(self) -> None:
        others = self._tasks - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=SETTLE)

    def close(self, final: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``final`` on the loop, let what is left end, then stop and close the loop;
        idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self._wait(self._submit(final), 10)
        self._settle()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


class Blocking(Generic[A]):
    """A blocking facade over an async object whose coroutines run on a ``LoopThread``."""

    def __init__(self, target: A, portal: LoopThread) -> None:
        self._target = target
        self._portal = portal


def forward(
    method: Callable[Concatenate[A, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Blocking[A], P], T]:
    """The blocking version of an async method, with the same signature and docstring."""

    @functools.wraps(method)
    def call(self: Blocking[A], /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return self._portal.call(method, self._target, *args, **kwargs)
        except AmmError as err:
            # Raised afresh here: an uncaught one shows the caller's frames and its one-line
            # message, not the event loop thread's and the futures' machinery in between.
            raise err.with_traceback(None) from None

    return call
