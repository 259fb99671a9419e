"""Small helpers shared by the streaming tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from core.streaming import Consumer, Event

T = TypeVar("T")


def poll_until(consumer: Consumer, count: int, *, timeout_s: float = 20) -> list[Event]:
    """Polls until ``count`` events arrived (a Kafka group join takes a few seconds) or fails."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count:
        assert time.monotonic() < deadline, f"got {len(events)} of {count} events within {timeout_s}s: {events}"
        events += consumer.poll(timeout_ms=200)
    return events


def values(events: list[Event], field: str = "i") -> list[object]:
    """The ``field`` of each event's value, in order."""
    return [event.value[field] for event in events]


def in_parallel(*calls: Callable[[], T]) -> list[T]:
    """Runs the calls on threads and returns their results, so Kafka group joins (~3 s) overlap."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]
