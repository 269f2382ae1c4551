"""Blocking facades over asyncio objects: a private event loop in a thread, and method forwarding.

``Client`` is an ``AsyncClient`` driven from synchronous code. Rather than write each method
twice, ``forward`` turns an async method into a blocking one with the same signature (checked by
mypy through ``ParamSpec``) that runs the coroutine on a ``LoopThread`` and waits for it. Every
``grpc.aio`` object is created and used on that one loop. Nothing here knows about amm's RPCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import grpc

from amm.errors import AmmError

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")


class LoopThread:
    """A private event loop running in a daemon thread; ``run`` blocks on one coroutine."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="amm-client-loop", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._closed:
                coro.close()
                raise AmmError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, final: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``final`` on the loop, then stop and close the loop; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(final(), self._loop).result(timeout=10)
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
            return self._portal.run(method(self._target, *args, **kwargs))
        except AmmError as err:
            # Raised afresh here: an uncaught one shows the caller's frames and its one-line
            # message, not the event loop thread's and the futures' machinery in between.
            raise err.with_traceback(None) from None

    return call
