"""Group-free reading (``end_offsets``, ``committed``, ``read``), shared by every backend."""

from __future__ import annotations

from collections import defaultdict

import pytest

from core.streaming import Event, EventBus
from tests.fixtures.kafka import unique_name

from .helpers import poll_until, values

N_EVENTS = 20


def _by_partition(events: list[Event]) -> dict[int, list[Event]]:
    grouped: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        grouped[event.partition].append(event)
    return dict(grouped)


def _flatten(batches: list[list[Event]]) -> list[Event]:
    return [event for batch in batches for event in batch]


@pytest.fixture
def topic(bus: EventBus) -> str:
    """A 2-partition topic holding events ``i = 0..N_EVENTS-1``, keyed so both partitions get some."""
    name = unique_name("read")
    bus.create_topics([name], partitions=2)
    for i in range(N_EVENTS):
        bus.publish(name, {"i": i}, key=f"card-{i % 7}")
    bus.flush()
    return name


def test_read_everything_by_default_in_per_partition_order(bus: EventBus, topic: str) -> None:
    events = _flatten(list(bus.read(topic)))
    assert sorted(values(events)) == list(range(N_EVENTS))
    by_partition = _by_partition(events)
    assert set(by_partition) == {0, 1}, "the keys should spread over both partitions"
    for partition_events in by_partition.values():
        assert [e.offset for e in partition_events] == list(range(len(partition_events)))
        assert values(partition_events) == sorted(values(partition_events))  # one key keeps its order
    assert {e.topic for e in events} == {topic}
    assert all(e.key is not None and e.key.startswith("card-") for e in events)


def test_end_offsets_are_the_next_offset_of_each_partition(bus: EventBus, topic: str) -> None:
    counts = {p: len(evs) for p, evs in _by_partition(_flatten(list(bus.read(topic)))).items()}
    assert bus.end_offsets(topic) == counts
    assert sum(counts.values()) == N_EVENTS
    empty = unique_name("empty")
    bus.create_topics([empty], partitions=2)
    assert bus.end_offsets(empty) == {0: 0, 1: 0}


def test_read_between_explicit_start_and_end(bus: EventBus, topic: str) -> None:
    everything = _by_partition(_flatten(list(bus.read(topic))))
    ends = bus.end_offsets(topic)
    start, end = {0: 1, 1: 2}, {0: ends[0] - 1}  # partition 1 runs to its log end
    expected = everything[0][1 : ends[0] - 1] + everything[1][2:]
    events = _flatten(list(bus.read(topic, start=start, end=end)))
    assert sorted((e.partition, e.offset, e.value["i"]) for e in events) == sorted(
        (e.partition, e.offset, e.value["i"]) for e in expected
    )
    for partition_events in _by_partition(events).values():
        offsets = [e.offset for e in partition_events]
        assert offsets == sorted(offsets)
    assert list(bus.read(topic, start=ends)) == []
    assert list(bus.read(topic, end={0: 0, 1: 0})) == []
    # An end past the log end means the log end: reading never waits for records not yet written.
    assert len(_flatten(list(bus.read(topic, end={0: 10**6, 1: 10**6})))) == N_EVENTS


def test_read_yields_batches_of_at_most_batch_size(bus: EventBus, topic: str) -> None:
    batches = list(bus.read(topic, batch_size=3))
    assert batches and all(0 < len(batch) <= 3 for batch in batches)
    assert sorted(values(_flatten(batches))) == list(range(N_EVENTS))


def test_read_stops_at_the_log_end_of_the_call(bus: EventBus, topic: str) -> None:
    reader = bus.read(topic)  # bounds are fixed here, before iterating
    bus.publish(topic, {"i": N_EVENTS}, key="late")
    bus.flush()
    assert sorted(values(_flatten(list(reader)))) == list(range(N_EVENTS))
    assert len(_flatten(list(bus.read(topic)))) == N_EVENTS + 1


def test_read_skips_undecodable_records(bus: EventBus) -> None:
    topic = unique_name("bad")
    bus.create_topics([topic])
    bus.publish(topic, {"i": 0})
    bus.publish(topic, b"\x00not json")
    bus.publish(topic, {"i": 2})
    bus.flush()
    events = _flatten(list(bus.read(topic)))
    assert [(e.offset, e.value["i"]) for e in events] == [(0, 0), (2, 2)]
    assert bus.end_offsets(topic) == {0: 3}


def test_missing_topic_reads_nothing_and_is_not_created(bus: EventBus) -> None:
    missing = unique_name("missing")
    assert list(bus.read(missing)) == []
    assert list(bus.read(missing, start={0: 5}, end={0: 9})) == []
    assert bus.end_offsets(missing) == {}
    assert bus.committed(missing, group_id=unique_name("g")) == {}
    assert bus.end_offsets(missing) == {}


def test_committed_follows_group_commits_and_read_changes_nothing(bus: EventBus, topic: str) -> None:
    group = unique_name("g")
    assert bus.committed(topic, group_id=group) == {0: 0, 1: 0}
    assert len(_flatten(list(bus.read(topic)))) == N_EVENTS
    assert bus.committed(topic, group_id=group) == {0: 0, 1: 0}, "read must not commit for any group"
    with bus.consumer([topic], group_id=group) as consumer:
        poll_until(consumer, N_EVENTS)
        consumer.commit()
    ends = bus.end_offsets(topic)
    assert bus.committed(topic, group_id=group) == ends
    bus.publish(topic, {"i": N_EVENTS}, key="late")
    bus.flush()
    assert len(_flatten(list(bus.read(topic)))) == N_EVENTS + 1
    assert bus.committed(topic, group_id=group) == ends
    # The restore pattern: replay up to what the group committed, i.e. everything but the late event.
    replayed = _flatten(list(bus.read(topic, end=bus.committed(topic, group_id=group))))
    assert sorted(values(replayed)) == list(range(N_EVENTS))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b, t: b.read("bad topic!"), "invalid topic name 'bad topic!'"),
        (lambda b, t: b.end_offsets("bad topic!"), "invalid topic name 'bad topic!'"),
        (lambda b, t: b.committed(t, group_id=""), "group_id must be a non-empty string"),
        (lambda b, t: b.read(t, batch_size=0), "batch_size must be a positive int"),
        (lambda b, t: b.read(t, start={0: -1}), "start: offset must be a non-negative int"),
        (lambda b, t: b.read(t, end=[5]), "end must be a mapping"),
        (lambda b, t: b.read(t, start={5: 0}), r"start names partitions \[5\] but topic .* has \[0, 1\]"),
    ],
)
def test_bad_read_arguments_raise_clear_errors(bus: EventBus, topic: str, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(bus, topic)
