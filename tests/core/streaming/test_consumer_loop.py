"""run_consumer: at-least-once processing with a dead-letter topic for bad events."""

from __future__ import annotations

import base64
import threading

import pytest

from core.streaming import Event, EventBus, MalformedEventError, create_bus, run_consumer
from tests.fixtures.kafka import unique_name

from .helpers import in_parallel, poll_until, values


def _reject_negative(events: list[Event]) -> list[tuple[Event, str]]:
    return [(e, "amount must be >= 0") for e in events if e.value["amount"] < 0]


def test_malformed_and_rejected_events_go_to_the_dlq_and_the_rest_is_processed(bus: EventBus) -> None:
    topic, group = unique_name("tx"), unique_name("g")
    bus.create_topics([topic, f"{topic}.dlq"])
    bus.publish(topic, {"amount": 1})
    bus.publish(topic, b"{truncated", key="card-9")
    bus.publish(topic, b"[1, 2]")
    bus.publish(topic, {"amount": -5}, key="card-7")
    bus.publish(topic, {"amount": 2})
    bus.flush()
    seen: list[object] = []

    def handler(events: list[Event]) -> list[tuple[Event, str]]:
        seen.extend(values(events, "amount"))
        return _reject_negative(events)

    stats = run_consumer(bus, [topic], group_id=group, handler=handler, max_events=5, idle_timeout_s=20)
    assert (stats.processed, stats.dead_lettered, stats.batches) == (2, 3, 1)
    assert seen == [1, -5, 2]
    bus.publish(topic, {"amount": 3})
    bus.flush()
    reader = bus.consumer([f"{topic}.dlq"], group_id=unique_name("dlq-reader"))
    again = bus.consumer([topic], group_id=group)
    with reader, again:
        dead_events, left = in_parallel(lambda: poll_until(reader, 3), lambda: poll_until(again, 1))
    assert values(left, "amount") == [3], "run_consumer must have committed everything it handled"
    dead = {e.value["offset"]: e for e in dead_events}
    assert sorted(dead) == [1, 2, 3]
    assert "not valid JSON" in dead[1].value["reason"]
    assert base64.b64decode(dead[1].value["raw_base64"]) == b"{truncated"
    assert (dead[1].key, dead[1].header("keel.dlq.topic"), dead[1].header("keel.dlq.offset")) == ("card-9", topic, "1")
    assert "JSON list, expected a JSON object" in dead[2].value["reason"]
    assert dead[3].value["value"] == {"amount": -5}
    assert dead[3].header("keel.dlq.reason") == "amount must be >= 0"


def test_handler_can_raise_for_one_event_and_gets_the_rest_again() -> None:
    bus = create_bus("memory")
    for amount in (1, -1, 2):
        bus.publish("tx", {"amount": amount})
    calls: list[list[object]] = []

    def handler(events: list[Event]) -> None:
        calls.append(values(events, "amount"))
        for event in events:
            if event.value["amount"] < 0:
                raise MalformedEventError("negative amount", event=event)

    stats = run_consumer(bus, ["tx"], group_id="g", handler=handler, dead_letter_topic="bad", idle_timeout_s=0.2)
    assert calls == [[1, -1, 2], [1, 2]]
    assert (stats.processed, stats.dead_lettered) == (2, 1)
    dead = poll_until(bus.consumer(["bad"], group_id="r"), 1)
    assert dead[0].value["reason"] == "negative amount"
    assert dead[0].value["topic"] == "tx"


def test_crashing_handler_commits_nothing_so_the_batch_is_redelivered() -> None:
    bus = create_bus("memory")
    for i in range(3):
        bus.publish("tx", {"i": i})

    def crash(events: list[Event]) -> None:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        run_consumer(bus, ["tx"], group_id="g", handler=crash, idle_timeout_s=0.2)

    def reject_without_event(events: list[Event]) -> None:
        raise MalformedEventError("no event attached")

    with pytest.raises(MalformedEventError, match="no event attached"):  # cannot isolate it: also a crash
        run_consumer(bus, ["tx"], group_id="g", handler=reject_without_event, idle_timeout_s=0.2)
    received: list[object] = []
    stats = run_consumer(bus, ["tx"], group_id="g", handler=lambda evs: received.extend(values(evs)), max_events=3)
    assert received == [0, 1, 2]
    assert stats.processed == 3


def test_stop_event_and_idle_timeout_end_the_loop() -> None:
    bus = create_bus("memory")
    stop = threading.Event()
    stop.set()
    stats = run_consumer(bus, ["tx"], group_id="g", handler=lambda evs: None, stop=stop)
    assert (stats.processed, stats.batches) == (0, 0)
    stats = run_consumer(bus, ["tx"], group_id="g", handler=lambda evs: None, idle_timeout_s=0.05, poll_timeout_ms=10)
    assert stats.batches == 0 and stats.elapsed_s >= 0.05


def test_handler_returning_garbage_is_a_type_error() -> None:
    bus = create_bus("memory")
    bus.publish("tx", {"i": 1})
    with pytest.raises(TypeError, match=r"must return None or \(event, reason\) pairs"):
        run_consumer(bus, ["tx"], group_id="g", handler=lambda evs: ["oops"], max_events=1)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="max_events must be a positive int"):
        run_consumer(bus, ["tx"], group_id="g", handler=lambda evs: None, max_events=0)
