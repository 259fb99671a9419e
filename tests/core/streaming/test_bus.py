"""EventBus behaviour shared by every backend: keys, groups, committed offsets, redelivery."""

from __future__ import annotations

import pytest

from core.streaming import BUS_BACKENDS, EventBus, create_bus
from core.utils.registry import UnknownNameError
from tests.fixtures.kafka import unique_name

from .helpers import in_parallel, poll_until, values


def test_both_backends_are_registered() -> None:
    assert {"memory", "kafka"} <= set(BUS_BACKENDS.names())


def test_unknown_backend_error_lists_known_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown event bus backend 'rabbit'; known: .*kafka.*memory"):
        create_bus("rabbit")


def test_publish_and_consume_keeps_keys_values_and_order(bus: EventBus) -> None:
    topic = unique_name("keys")
    bus.create_topics([topic])
    bus.create_topics([topic])  # idempotent
    for i in range(5):
        bus.publish(topic, {"i": i, "card": f"c{i % 2}"}, key=f"c{i % 2}", headers={"source": "test"})
    bus.publish(topic, {"i": 5})  # keyless
    bus.flush()
    with bus.consumer([topic], group_id=unique_name("g")) as consumer:
        events = poll_until(consumer, 6)
        consumer.commit()
    assert values(events) == [0, 1, 2, 3, 4, 5]
    assert [e.key for e in events] == ["c0", "c1", "c0", "c1", "c0", None]
    assert [e.offset for e in events] == list(range(6))
    assert {(e.topic, e.partition) for e in events} == {(topic, 0)}
    assert events[0].header("source") == "test"
    assert all(e.timestamp_ms > 1_600_000_000_000 for e in events)


def test_group_resumes_after_commit_and_redelivers_uncommitted_batch(bus: EventBus) -> None:
    topic, group = unique_name("resume"), unique_name("g")
    bus.create_topics([topic])
    for i in range(6):
        bus.publish(topic, {"i": i}, key="k")
    bus.flush()
    with bus.consumer([topic], group_id=group, max_poll_records=3) as first:
        assert values(poll_until(first, 3)) == [0, 1, 2]
        first.commit()
        assert values(poll_until(first, 3)) == [3, 4, 5]
        # Crash before commit: closing must not acknowledge 3..5.
    with bus.consumer([topic], group_id=group, max_poll_records=3) as second:
        assert values(poll_until(second, 3)) == [3, 4, 5]
        second.commit()
        bus.publish(topic, {"i": 6}, key="k")
        bus.flush()
        assert values(poll_until(second, 1)) == [6]
        assert second.poll(timeout_ms=300) == []


def test_groups_are_independent_and_each_sees_everything(bus: EventBus) -> None:
    topic = unique_name("fanout")
    bus.create_topics([topic])
    for i in range(4):
        bus.publish(topic, {"i": i}, key=str(i))
    bus.flush()
    scorer = bus.consumer([topic], group_id=unique_name("scorer"))
    auditor = bus.consumer([topic], group_id=unique_name("auditor"))
    with scorer, auditor:
        # Each consumer is used by one thread only; the threads just let the two group joins overlap.
        seen = in_parallel(lambda: values(poll_until(scorer, 4)), lambda: values(poll_until(auditor, 4)))
    assert seen == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_undecodable_records_are_skipped_by_poll_and_kept_for_the_dlq() -> None:
    bus = create_bus("memory")  # Kafka's decode path is covered by the dead-letter test of run_consumer
    topic = unique_name("bad")
    bus.create_topics([topic])
    bus.publish(topic, {"i": 0})
    bus.publish(topic, b"\x00not json", key="k")
    bus.publish(topic, {"i": 2})
    bus.flush()
    with bus.consumer([topic], group_id=unique_name("g")) as consumer:
        events = poll_until(consumer, 2)
        malformed = consumer.take_malformed()
    assert values(events) == [0, 2]
    assert [(m.offset, m.key, m.raw) for m in malformed] == [(1, "k", b"\x00not json")]
    assert "not valid JSON" in malformed[0].reason


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.publish("bad topic!", {}), "invalid topic name 'bad topic!'"),
        (lambda b: b.publish("t", [1]), "event value must be a dict"),
        (lambda b: b.publish("t", {}, key=7), "key must be str or None"),
        (lambda b: b.consumer("topic", group_id="g"), "topics must be a non-empty list"),
        (lambda b: b.consumer([], group_id="g"), "topics must be a non-empty list"),
        (lambda b: b.consumer(["t"], group_id=""), "group_id must be a non-empty string"),
        (lambda b: b.consumer(["t"], group_id="g", auto_offset_reset="none"), "auto_offset_reset must be one of"),
        (lambda b: b.consumer(["t"], group_id="g", max_poll_records=0), "max_poll_records must be a positive int"),
        (lambda b: b.create_topics(["t"], partitions=0), "partitions must be a positive int"),
    ],
)
def test_bad_arguments_raise_clear_errors(bus: EventBus, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=message):
        call(bus)
