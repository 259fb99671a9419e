"""MicroBatcher: grouping, delay, error isolation, bucketing, no-batching mode, closing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from core.serving.batching import BatcherClosedError, MicroBatcher


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


class Recorder:
    """A batch function doubling numbers; records each batch; fails a batch holding a negative number."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(isinstance(i, int) and i < 0 for i in items):
            raise ValueError(f"negative item in batch {items}")
        return [i * 2 for i in items]


def test_zero_delay_batches_what_queued_while_the_previous_batch_ran() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            release.wait(timeout=10)  # hold the first batch until the others have queued
        return items

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=64, max_delay_ms=0)
        try:
            first = asyncio.ensure_future(batcher.submit(0))
            while not batches:  # the lone first request runs at once, without waiting for company
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
            await asyncio.sleep(0.05)
            release.set()
            return await asyncio.gather(first, *rest)
        finally:
            await batcher.close()

    assert run(main) == list(range(6))
    assert batches == [[0], [1, 2, 3, 4, 5]]


def test_concurrent_requests_are_grouped_up_to_max_batch_size() -> None:

    fn = Recorder()

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=8, max_delay_ms=50)
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        finally:
            assert batcher.stats.items == 20
            assert batcher.stats.max_size == 8
            await batcher.close()

    assert run(main) == [2 * i for i in range(20)]
    assert [len(b) for b in fn.batches] == [8, 8, 4]
    assert all(name.startswith("keel-batch") for name in fn.threads)


def test_a_lone_request_runs_after_max_delay() -> None:
    fn = Recorder()

    async def main() -> float:
        batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=64, max_delay_ms=30)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(batcher.submit(5), timeout=30) == 10
        waited = loop.time() - start
        await batcher.close()
        return waited

    # A lower bound only: the batcher must have held the request for company before running it alone.
    assert run(main) >= 0.03 - 1e-3
    assert fn.batches == [[5]]


def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    fn = Recorder()

    async def main() -> None:
        # A 1-hour delay: the test only finishes because a full batch runs at once.
        batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=2, max_delay_ms=3_600_000)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)
        second = asyncio.create_task(batcher.submit(2))
        assert await asyncio.wait_for(asyncio.gather(first, second), timeout=30) == [2, 4]
        await batcher.close()

    run(main)
    assert fn.batches == [[1, 2]]


def test_an_error_fails_only_its_own_batch() -> None:
    fn = Recorder()

    async def main() -> list[Any]:
        batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=2, max_delay_ms=50)
        results = await asyncio.gather(*(batcher.submit(i) for i in (1, -1, 2, 3)), return_exceptions=True)
        assert await batcher.submit(4) == 8  # the batcher keeps working after a failed batch
        await batcher.close()
        return results

    first, second, third, fourth = run(main)
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert "negative item" in str(first)
    assert (third, fourth) == (4, 6)


def test_max_batch_size_one_calls_fn_per_item_in_the_worker_thread() -> None:
    fn = Recorder()

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=1)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        assert dict(batcher.stats.sizes) == {1: 5}
        await batcher.close()
        return results

    assert run(main) == [0, 2, 4, 6, 8]
    assert all(len(b) == 1 for b in fn.batches)
    assert all(name.startswith("keel-batch") for name in fn.threads)


def test_bucket_key_keeps_different_buckets_apart() -> None:
    fn = Recorder()

    async def main() -> list[str]:
        batcher: MicroBatcher[str, str] = MicroBatcher(fn, max_batch_size=16, max_delay_ms=20, bucket_key=len)
        words = ["a", "bb", "c", "dd", "eee", "f"]
        results = await asyncio.gather(*(batcher.submit(w) for w in words))
        await batcher.close()
        return results

    assert run(main) == ["aa", "bbbb", "cc", "dddd", "eeeeee", "ff"]
    assert sorted(map(sorted, fn.batches)) == [["a", "c", "f"], ["bb", "dd"], ["eee"]]


def test_a_failing_bucket_key_fails_only_that_item() -> None:
    async def main() -> Any:
        batcher: MicroBatcher[Any, Any] = MicroBatcher(Recorder(), max_batch_size=4, max_delay_ms=20, bucket_key=len)
        results = await asyncio.gather(batcher.submit("ab"), batcher.submit(7), return_exceptions=True)
        await batcher.close()
        return results

    ok, bad = run(main)
    assert ok == "abab"
    assert isinstance(bad, TypeError)


def test_wrong_number_of_results_is_a_clear_error() -> None:
    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items[:1], max_batch_size=4, max_delay_ms=20)
        with pytest.raises(ValueError, match="one result per item: 3 items, got 1 results"):
            await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        await batcher.close()

    run(main)


def test_close_rejects_new_requests() -> None:
    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(Recorder(), max_batch_size=4, max_delay_ms=3_600_000)
        waiting = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await waiting
        with pytest.raises(BatcherClosedError, match="closed"):
            await batcher.submit(2)

    run(main)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"max_batch_size": 0}, "max_batch_size"), ({"max_delay_ms": -1}, "max_delay_ms")]
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MicroBatcher(Recorder(), **kwargs)


def test_close_fails_a_batch_that_is_still_running() -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow(items: list[int]) -> list[int]:
        entered.set()
        release.wait(timeout=30)
        return items

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(slow, max_batch_size=2, max_delay_ms=1)
        running = asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        async with asyncio.timeout(30):
            while not entered.is_set():
                await asyncio.sleep(0.005)
        await batcher.close()
        results = await asyncio.wait_for(running, timeout=30)  # failed, not left hanging
        release.set()
        assert all(isinstance(r, BatcherClosedError) for r in results)

    run(main)


def test_worker_init_runs_once_in_the_worker_thread() -> None:
    inits: list[str] = []

    async def main() -> None:
        def init() -> None:
            inits.append(threading.current_thread().name)

        batcher: MicroBatcher[int, int] = MicroBatcher(Recorder(), max_batch_size=4, max_delay_ms=1, worker_init=init)
        for i in range(3):
            assert await batcher.submit(i) == 2 * i
        await batcher.close()

    run(main)
    assert len(inits) == 1 and inits[0].startswith("keel-batch")
