"""What only the in-process backend has to get right itself: partitioning, group balance, threads."""

from __future__ import annotations

import threading

import pytest

from core.streaming import create_bus

from .helpers import poll_until, values


def test_same_key_always_lands_in_the_same_partition() -> None:
    bus = create_bus("memory", default_partitions=4)
    for i in range(40):
        bus.publish("pay", {"i": i}, key=f"card-{i % 5}")
    consumer = bus.consumer(["pay"], group_id="g")
    events = poll_until(consumer, 40)
    partitions_by_key: dict[str | None, set[int]] = {}
    for event in events:
        partitions_by_key.setdefault(event.key, set()).add(event.partition)
    assert all(len(parts) == 1 for parts in partitions_by_key.values())
    assert len({p for parts in partitions_by_key.values() for p in parts}) > 1
    for key in partitions_by_key:  # per-key order is kept
        assert values([e for e in events if e.key == key]) == sorted(values([e for e in events if e.key == key]))


def test_group_members_split_partitions_and_take_over_uncommitted_ones_on_leave() -> None:
    bus = create_bus("memory")
    bus.create_topics(["pay"], partitions=4)
    for i in range(8):
        bus.publish("pay", {"i": i})  # keyless: round robin over the 4 partitions
    a = bus.consumer(["pay"], group_id="g")
    b = bus.consumer(["pay"], group_id="g")
    got_a, got_b = poll_until(a, 4), poll_until(b, 4)
    assert {e.partition for e in got_a}.isdisjoint({e.partition for e in got_b})
    assert sorted(values(got_a + got_b)) == list(range(8))
    b.commit()
    a.close()  # without commit: b must get a's events again
    assert sorted(values(poll_until(b, 4))) == sorted(values(got_a))
    assert b.poll(timeout_ms=50) == []


def test_latest_skips_history_and_earliest_reads_it() -> None:
    bus = create_bus("memory")
    bus.publish("t", {"i": 0})
    latest = bus.consumer(["t"], group_id="new", auto_offset_reset="latest")
    earliest = bus.consumer(["t"], group_id="old")
    assert latest.poll(timeout_ms=10) == []
    bus.publish("t", {"i": 1})
    assert values(poll_until(latest, 1)) == [1]
    assert values(poll_until(earliest, 2)) == [0, 1]


def test_poll_wakes_up_when_another_thread_publishes() -> None:
    bus = create_bus("memory")
    bus.create_topics(["t"])
    consumer = bus.consumer(["t"], group_id="g")
    timer = threading.Timer(0.05, bus.publish, args=("t", {"i": 1}))
    timer.start()
    assert values(consumer.poll(timeout_ms=5000)) == [1]
    timer.join()


def test_concurrent_publishers_lose_nothing() -> None:
    bus = create_bus("memory", default_partitions=3)
    threads = [
        threading.Thread(target=lambda n=n: [bus.publish("t", {"i": n * 1000 + i}, key=str(i)) for i in range(500)])
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = poll_until(bus.consumer(["t"], group_id="g", max_poll_records=10_000), 2000)
    assert sorted(values(events)) == sorted(n * 1000 + i for n in range(4) for i in range(500))


def test_closed_bus_and_consumer_refuse_work_with_clear_errors() -> None:
    bus = create_bus("memory")
    consumer = bus.consumer(["t"], group_id="g")
    consumer.close()
    with pytest.raises(RuntimeError, match="consumer of group 'g' is closed"):
        consumer.poll(timeout_ms=0)
    bus.close()
    with pytest.raises(RuntimeError, match="MemoryBus is closed"):
        bus.publish("t", {})
    with pytest.raises(ValueError, match="default_partitions must be a positive int"):
        create_bus("memory", default_partitions=0)
