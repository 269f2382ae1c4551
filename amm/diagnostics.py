"""``MemorySampler``: cluster-wide memory over time, sampled from the AMM, as Dask users know it.

The API is that of ``distributed.diagnostics.MemorySampler``::

    from amm import Client
    from amm.diagnostics import MemorySampler

    client = Client("127.0.0.1:50051")
    ms = MemorySampler()
    with ms.sample("AMM off", client=client, measure="managed", interval=0.5):
        ...                                   # run the workload
    ms.samples["AMM off"]                     # [(unix time, bytes), ...]
    ms.to_pandas(align=True)                  # one column per label
    ms.plot(align=True, grid=True)            # matplotlib axes

With an ``AsyncClient``, ``async with ms.sample(...)`` does the same on the running loop. Without
a client, the sampler connects to ``$AMM_ADDRESS`` (or 127.0.0.1:50051) for the sampling's length,
over TLS when ``$AMM_TLS`` names a certs folder.

Each sample asks the AMM for its workers after polling every agent (``ListWorkers`` with
``fresh``), so samples are current whether or not the AMM is running cycles, and sums the
chosen measure over the workers: ``process`` (RSS), ``managed`` (bytes of the keys held) or
``optimistic`` (managed plus unmanaged memory that persisted). ``to_pandas`` and ``plot`` need
pandas and matplotlib: ``pip install 'amm[diagnostics]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from amm.base.security import Security
from amm.client import DEFAULT_ADDRESS, AsyncClient, Client
from amm.errors import AmmError
from amm.models import WorkerInfo

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MEASURES", "MemorySampler", "cluster_memory", "require_extra"]

log = logging.getLogger(__name__)

Measure = Literal["process", "managed", "optimistic"]
MEASURES: tuple[Measure, ...] = ("process", "managed", "optimistic")
_FIELDS: dict[str, Callable[[WorkerInfo], int]] = {
    "process": lambda w: w.process_bytes,
    "managed": lambda w: w.managed_bytes,
    "optimistic": lambda w: w.optimistic_bytes,
}


def cluster_memory(workers: Sequence[WorkerInfo], measure: str) -> int:
    """The sum of ``measure`` over ``workers``, in bytes."""
    return sum(_FIELDS[measure](w) for w in workers)


def require_extra(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"MemorySampler.{what} needs {module}, which is not installed: "
            "pip install 'amm[diagnostics]' (pandas and matplotlib)"
        ) from None


def _default_address() -> str:
    return os.environ.get("AMM_ADDRESS", DEFAULT_ADDRESS)


class _Sampling:
    """One ``sample(...)`` context: sync (a thread) or async (a task), never both at once."""

    def __init__(
        self,
        sampler: MemorySampler,
        label: str,
        client: Client | AsyncClient | None,
        measure: str,
        interval: float,
    ) -> None:
        self._sampler = sampler
        self._label = label
        self._client = client
        self._measure = measure
        self._interval = interval
        self._series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._own_client: Client | AsyncClient | None = None
        self._warned = False

    def _begin(self) -> None:
        self._sampler.samples[self._label] = self._series
        self._sampler._intervals[self._label] = self._interval

    def _record(self, workers: Sequence[WorkerInfo]) -> None:
        self._series.append((time.time(), cluster_memory(workers, self._measure)))

    def _missed(self, err: AmmError) -> None:
        """A sample that failed (the AMM restarting, say) is skipped, with one warning."""
        if not self._warned:
            self._warned = True
            log.warning("MemorySampler %r: a sample failed (%s); skipping it", self._label, err)

    # -- synchronous -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        client = self._client
        if isinstance(client, AsyncClient):
            raise TypeError("sample() with an AsyncClient is used as `async with`")
        if client is None:
            client = Client(_default_address(), security=Security.from_env())
            self._own_client = client
        self._begin()
        try:
            self._record(client.workers(fresh=True))
        except BaseException:
            self._close_own_sync()
            raise
        self._thread = threading.Thread(
            target=self._run_sync, args=(client,), name=f"memory-sampler {self._label}", daemon=True
        )
        self._thread.start()
        return self

    def _run_sync(self, client: Client) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._record(client.workers(fresh=True))
            except AmmError as err:
                self._missed(err)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        client = self._client or self._own_client
        try:
            if isinstance(client, Client):
                with contextlib.suppress(AmmError):
                    self._record(client.workers(fresh=True))
        finally:
            self._close_own_sync()

    def _close_own_sync(self) -> None:
        if isinstance(self._own_client, Client):
            self._own_client.close()
        self._own_client = None

    # -- asynchronous ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        client = self._client
        if isinstance(client, Client):
            raise TypeError("sample() with a blocking Client is used as `with`, not `async with`")
        if client is None:
            client = AsyncClient(_default_address(), security=Security.from_env())
            self._own_client = client
        self._begin()
        try:
            self._record(await client.workers(fresh=True))
        except BaseException:
            await self._close_own_async()
            raise
        self._task = asyncio.create_task(
            self._run_async(client), name=f"memory-sampler {self._label}"
        )
        return self

    async def _run_async(self, client: AsyncClient) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self._record(await client.workers(fresh=True))
            except AmmError as err:
                self._missed(err)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client = self._client or self._own_client
        try:
            if isinstance(client, AsyncClient):
                with contextlib.suppress(AmmError):
                    self._record(await client.workers(fresh=True))
        finally:
            await self._close_own_async()

    async def _close_own_async(self) -> None:
        if isinstance(self._own_client, AsyncClient):
            await self._own_client.close()
        self._own_client = None


class MemorySampler:
    """Sample cluster-wide memory every ``interval`` seconds while a ``sample`` block runs.

    ``samples[label]`` is a list of ``(unix time, bytes)`` tuples; it fills while the block
    runs, so it can be read live, and always holds a first and a last sample.
    """

    samples: dict[str, list[tuple[float, int]]]

    def __init__(self) -> None:
        self.samples = {}
        self._intervals: dict[str, float] = {}

    def sample(
        self,
        label: str | None = None,
        *,
        client: Client | AsyncClient | None = None,
        measure: str = "process",
        interval: float = 0.5,
    ) -> _Sampling:
        """A context manager (``with`` or ``async with``) that records memory under ``label``.

        ``measure``: ``process``, ``managed`` or ``optimistic``. A label used again replaces
        its samples, as in Dask.
        """
        if measure not in MEASURES:
            raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        return _Sampling(self, label or uuid.uuid4().hex, client, measure, interval)

    def to_pandas(self, *, align: bool = False) -> pd.DataFrame:
        """The samples as a DataFrame, one column per label, in bytes.

        ``align``: index each series by the time since its first sample, so that runs made one
        after the other can be compared side by side; otherwise by absolute time.
        """
        pandas = require_extra("pandas", "to_pandas")
        series = {}
        for label, samples in self.samples.items():
            if not samples:
                continue
            s = pandas.DataFrame(samples).set_index(0)[1]
            s.index = pandas.to_datetime(s.index, unit="s")
            s.name = label
            if align:
                s.index -= s.index[0]
            series[label] = s[~s.index.duplicated()]
        frame = pandas.DataFrame(series)
        if len(series) > 1:
            # Fill the gaps that another series' timestamps open in the middle of a series,
            # but never beyond its own last sample.
            frame = frame.ffill().where(~pandas.isna(frame.bfill()))
        return frame

    def plot(self, *, align: bool = False, **kwargs: Any) -> Any:
        """Plot the series in GiB (matplotlib); ``kwargs`` go to ``pandas.DataFrame.plot``."""
        require_extra("matplotlib", "plot")
        frame = self.to_pandas(align=align)
        step = min(self._intervals.values(), default=1.0)
        resampled = frame.resample(f"{max(1, round(step * 1000))}ms").nearest() / 2**30
        if align:
            resampled.index = resampled.index.total_seconds()
        kwargs.setdefault("xlabel", "time (s)" if align else "time")
        kwargs.setdefault("ylabel", "Cluster memory (GiB)")
        return resampled.plot(**kwargs)
