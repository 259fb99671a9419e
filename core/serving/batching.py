"""Dynamic micro-batching for model inference (after Triton's dynamic batcher and Ray Serve's ``@serve.batch``).

Concurrent requests are queued; one collector task takes the oldest one, waits at most ``max_delay_ms`` (counted
from when that request arrived) for up to ``max_batch_size`` requests in total, then runs the user function on the
whole batch in a single worker thread and hands each caller its own result. Under load, requests pile up while a
batch runs, so the next batch fills without waiting: latency stays bounded and throughput grows with load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["BatchStats", "BatcherClosedError", "MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class BatcherClosedError(RuntimeError):
    """Raised by :meth:`MicroBatcher.submit` after :meth:`MicroBatcher.close`."""


@dataclass
class BatchStats:
    """How many batches of each size ran (a histogram keyed by exact batch size)."""

    sizes: Counter[int] = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.sizes[size] += 1

    @property
    def batches(self) -> int:
        return sum(self.sizes.values())

    @property
    def items(self) -> int:
        return sum(size * count for size, count in self.sizes.items())

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    @property
    def max_size(self) -> int:
        return max(self.sizes, default=0)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    arrived: float


class MicroBatcher(Generic[T, R]):
    """Groups concurrent :meth:`submit` calls into batches for ``fn``.

    Args:
        fn: runs one batch; must return one result per item, in order. Called in a worker thread, one batch at a
            time, so a torch model is never run from two threads at once.
        max_batch_size: most items per batch; ``1`` turns batching off (each item is its own call, still run in the
            worker thread).
        max_delay_ms: longest time the oldest queued item waits for company before its batch runs; ``0`` (the
            default) waits for nobody: the batch is whatever queued while the previous batch ran.

        bucket_key: optional length bucketing: only items with the same key share a batch (e.g. ``len(tokens) //
            32``), so padding stays small.
        worker_init: run once in the worker thread before its first batch (e.g. to set torch's thread count).
        plan: optional batch planner, the general form of ``bucket_key``: given the items of a collected batch, returns
            the groups to run one after another as lists of indices into it, each index exactly once (e.g.
            :class:`core.lite.TokenBudgetPlanner`: similar lengths together, padded tokens under a budget). A plan
            that breaks that rule, or raises, fails the whole batch with the error. Not together with ``bucket_key``.

    An exception raised by ``fn`` fails only the futures of that batch.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int = 64,
        max_delay_ms: float = 0.0,
        bucket_key: Callable[[T], Hashable] | None = None,
        worker_init: Callable[[], None] | None = None,
        plan: Callable[[list[T]], Sequence[Sequence[int]]] | None = None,
    ) -> None:
        if bucket_key is not None and plan is not None:
            raise ValueError("give bucket_key or plan, not both (a plan can bucket by key itself)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.bucket_key = bucket_key
        self.worker_init = worker_init
        self.plan = plan
        self.stats = BatchStats()
        self._pending: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    async def submit(self, item: T) -> R:
        """Queues ``item`` and returns its result once its batch has run (re-raises the batch's exception)."""
        if self._closed:
            raise BatcherClosedError("the batcher is closed; no more requests are accepted")
        loop = asyncio.get_running_loop()
        if self.max_batch_size == 1:
            results = await self._run_in_worker([item])
            return results[0]
        self._ensure_collector(loop)
        assert self._wakeup is not None
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append(_Pending(item, future, loop.time()))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stops the collector, fails queued requests with :class:`BatcherClosedError`, frees the worker thread."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        _fail(self._pending, BatcherClosedError("the batcher closed before this request ran"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _ensure_collector(self, loop: asyncio.AbstractEventLoop) -> None:
        # Started lazily, inside the loop that serves requests (a TestClient or uvicorn loop, not the import-time one).
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._collect_forever(), name="keel-micro-batcher")

    async def _collect_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                for group in self._split_by_bucket(batch):
                    await self._run_group(group)
            except asyncio.CancelledError:  # closed mid-batch: nobody may be left waiting forever
                _fail(batch, BatcherClosedError("the batcher closed while this request's batch was running"))
                raise

    async def _next_batch(self) -> list[_Pending[T, R]]:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].arrived + self.max_delay_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        size = min(len(self._pending), self.max_batch_size)
        return [self._pending.popleft() for _ in range(size)]

    def _split_by_bucket(self, batch: list[_Pending[T, R]]) -> list[list[_Pending[T, R]]]:
        if self.plan is not None:
            return self._split_by_plan(batch, self.plan)
        if self.bucket_key is None:
            return [batch]
        groups: dict[Hashable, list[_Pending[T, R]]] = {}
        for pending in batch:
            try:
                key = self.bucket_key(pending.item)
            except Exception as exc:  # a bad item must fail alone, not take the batch down with it
                _fail([pending], exc)
                continue
            groups.setdefault(key, []).append(pending)
        return list(groups.values())

    @staticmethod
    def _split_by_plan(
        batch: list[_Pending[T, R]], plan: Callable[[list[T]], Sequence[Sequence[int]]]
    ) -> list[list[_Pending[T, R]]]:
        try:
            groups = [list(group) for group in plan([p.item for p in batch])]
            used = sorted(i for group in groups for i in group)
            if used != list(range(len(batch))) or not all(groups):
                raise ValueError(
                    f"batch plan must name each of the {len(batch)} items exactly once in non-empty groups; "
                    f"got {len(groups)} groups naming indices {used[:16]}{' ...' if len(used) > 16 else ''}"
                )
        except Exception as exc:  # every caller gets the planner's error instead of waiting forever
            _fail(batch, exc)
            return []
        return [[batch[i] for i in group] for group in groups]

    async def _run_group(self, group: list[_Pending[T, R]]) -> None:
        live = [p for p in group if not p.future.done()]  # callers that gave up (client went away) are skipped
        if not live:
            return
        try:
            results = await self._run_in_worker([p.item for p in live])
        except Exception as exc:
            _fail(live, exc)
            return
        for pending, result in zip(live, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    async def _run_in_worker(self, items: list[T]) -> list[R]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keel-batch", initializer=self.worker_init
            )
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.fn, items)
        if not isinstance(results, list | tuple) or len(results) != len(items):
            got = f"{len(results)} results" if isinstance(results, list | tuple) else type(results).__name__
            raise ValueError(f"batch function must return one result per item: {len(items)} items, got {got}")
        self.stats.record(len(items))
        return list(results)


def _fail(pending: Iterable[_Pending[Any, Any]], exc: BaseException) -> None:
    for p in pending:
        if not p.future.done():
            p.future.set_exception(exc)
