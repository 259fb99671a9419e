"""In-process event bus: Kafka's semantics (partitions, groups, committed offsets) without a broker.

Each topic is a list of append-only partition logs. Committed offsets live in the bus, keyed by
(group, topic, partition), so a new consumer of a group resumes after the last commit, exactly
like Kafka. Members of one group split the partitions (partition ``p`` of a topic goes to the
``p % n``-th member subscribed to it, in join order) and re-split whenever a member joins or
leaves or a topic appears; a partition that moves to another member restarts there from its
committed offset, so events polled but not committed are delivered again. All state is guarded
by one condition variable.
"""

from __future__ import annotations

import itertools
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from core.streaming.bus import (
    BUS_BACKENDS,
    Consumer,
    EventBus,
    check_batch_size,
    check_consumer_args,
    check_group_id,
    check_offsets,
    check_topic,
    check_topics,
    event_or_none,
    read_bounds,
    to_payload,
)
from core.streaming.events import Event, Headers, normalize_headers

__all__ = ["MemoryBus"]

TopicPartition = tuple[str, int]


class _Record(NamedTuple):
    key: str | None
    raw: bytes
    timestamp_ms: int
    headers: Headers


@BUS_BACKENDS.register("memory")
class MemoryBus(EventBus):
    """Thread-safe in-process bus, the default backend (tests, notebooks, single-process demos).

    Args:
        default_partitions: partitions of a topic created implicitly by its first publish.
    """

    def __init__(self, *, default_partitions: int = 1) -> None:
        if not isinstance(default_partitions, int) or default_partitions < 1:
            raise ValueError(f"default_partitions must be a positive int, got {default_partitions!r}")
        self._default_partitions = default_partitions
        self._cond = threading.Condition()
        self._logs: dict[str, list[list[_Record]]] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._members: dict[str, list[_MemoryConsumer]] = {}
        self._epoch = 0  # bumped on any membership or topic change: consumers then recompute assignment
        self._round_robin = itertools.count()
        self._closed = False

    # -- producing -------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        value: Mapping[str, Any] | bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str | bytes] | None = None,
    ) -> None:
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be str or None, got {type(key).__name__}")
        record = _Record(key, to_payload(value), int(time.time() * 1000), normalize_headers(headers))
        with self._cond:
            self._check_open()
            partitions = self._logs.get(topic) or self._create(check_topic(topic), self._default_partitions)
            if key is None:
                index = next(self._round_robin) % len(partitions)
            else:  # crc32 rather than hash(): stable across processes, like Kafka's murmur2
                index = zlib.crc32(key.encode("utf-8")) % len(partitions)
            partitions[index].append(record)
            self._cond.notify_all()

    def flush(self, timeout_s: float = 10) -> None:
        """Nothing to wait for: ``publish`` appends synchronously."""

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        if not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be a positive int, got {partitions!r}")
        checked = [check_topic(name) for name in names]
        with self._cond:
            self._check_open()
            for name in checked:
                if name not in self._logs:
                    self._create(name, partitions)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- consuming -------------------------------------------------------------------------------

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 2000,
    ) -> Consumer:
        checked = check_topics(topics)
        check_consumer_args(group_id=group_id, auto_offset_reset=auto_offset_reset, max_poll_records=max_poll_records)
        member = _MemoryConsumer(
            self, checked, group_id=group_id, auto_offset_reset=auto_offset_reset, max_poll_records=max_poll_records
        )
        with self._cond:
            self._check_open()
            self._members.setdefault(group_id, []).append(member)
            self._epoch += 1
        return member

    # -- reading without a group -----------------------------------------------------------------

    def end_offsets(self, topic: str) -> dict[int, int]:
        check_topic(topic)
        with self._cond:
            self._check_open()
            return {p: len(log) for p, log in enumerate(self._logs.get(topic, ()))}

    def committed(self, topic: str, *, group_id: str) -> dict[int, int]:
        check_topic(topic)
        check_group_id(group_id)
        with self._cond:
            self._check_open()
            n_partitions = len(self._logs.get(topic, ()))
            return {p: self._committed.get((group_id, topic, p), 0) for p in range(n_partitions)}

    def read(
        self,
        topic: str,
        *,
        start: Mapping[int, int] | None = None,
        end: Mapping[int, int] | None = None,
        batch_size: int = 2000,
    ) -> Iterator[list[Event]]:
        check_topic(topic)
        check_batch_size(batch_size)
        starts, ends = check_offsets("start", start), check_offsets("end", end)
        last = self.end_offsets(topic)  # the default end is the log end now, not when iteration starts
        bounds = read_bounds(topic, first=dict.fromkeys(last, 0), last=last, start=starts, end=ends)
        return self._read(topic, bounds, batch_size)

    def _read(self, topic: str, bounds: dict[int, tuple[int, int]], batch_size: int) -> Iterator[list[Event]]:
        batch: list[Event] = []
        for partition, (begin, stop) in bounds.items():
            for chunk_start in range(begin, stop, batch_size):
                with self._cond:
                    self._check_open()
                    records = self._logs[topic][partition][chunk_start : min(stop, chunk_start + batch_size)]
                for offset, rec in enumerate(records, start=chunk_start):
                    event = event_or_none(
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        key=rec.key,
                        raw=rec.raw,
                        timestamp_ms=rec.timestamp_ms,
                        headers=rec.headers,
                    )
                    if event is not None:
                        batch.append(event)
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
        if batch:
            yield batch

    # -- internals used by _MemoryConsumer (always with self._cond held) ---------------------------

    def _create(self, name: str, partitions: int) -> list[list[_Record]]:
        logs: list[list[_Record]] = [[] for _ in range(partitions)]
        self._logs[name] = logs
        self._epoch += 1
        return logs

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this MemoryBus is closed; create a new one with create_bus('memory')")

    def _assignment(self, member: _MemoryConsumer) -> list[TopicPartition]:
        group = self._members.get(member.group_id, [])
        assigned = []
        for topic in member.topics:
            subscribers = [m for m in group if topic in m.topics]
            rank = subscribers.index(member)
            n_partitions = len(self._logs.get(topic, ()))
            assigned += [(topic, p) for p in range(rank, n_partitions, len(subscribers))]
        return assigned

    def _leave(self, member: _MemoryConsumer) -> None:
        group = self._members.get(member.group_id, [])
        if member in group:
            group.remove(member)
            self._epoch += 1


class _MemoryConsumer(Consumer):
    def __init__(
        self,
        bus: MemoryBus,
        topics: Sequence[str],
        *,
        group_id: str,
        auto_offset_reset: str,
        max_poll_records: int,
    ) -> None:
        super().__init__(topics, group_id=group_id)
        self._bus = bus
        self._reset_to_end = auto_offset_reset == "latest"
        self._max_poll_records = max_poll_records
        self._positions: dict[TopicPartition, int] = {}
        self._epoch = -1
        self._next_start = 0  # rotates which partition is read first, so none starves
        self._closed = False

    def poll(self, timeout_ms: int = 1000) -> list[Event]:
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000
        cond = self._bus._cond
        with cond:
            while True:
                self._check_usable()
                fetched = self._fetch()
                remaining = deadline - time.monotonic()
                if fetched or remaining <= 0:
                    break
                cond.wait(remaining)
        # Decoding outside the lock keeps producers unblocked while a big batch is parsed.
        events = []
        for topic, partition, offset, rec in fetched:
            event = self._to_event(
                topic=topic,
                partition=partition,
                offset=offset,
                key=rec.key,
                raw=rec.raw,
                timestamp_ms=rec.timestamp_ms,
                headers=rec.headers,
            )
            if event is not None:
                events.append(event)
        return events

    def commit(self) -> None:
        with self._bus._cond:
            self._check_usable()
            for (topic, partition), position in self._positions.items():
                self._bus._committed[(self.group_id, topic, partition)] = position

    def close(self) -> None:
        with self._bus._cond:
            if not self._closed:
                self._closed = True
                self._bus._leave(self)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"consumer of group {self.group_id!r} is closed")
        self._bus._check_open()

    def _fetch(self) -> list[tuple[str, int, int, _Record]]:
        """Takes up to max_poll_records records from the assigned partitions (lock held)."""
        if self._epoch != self._bus._epoch:
            self._rebalance()
        fetched: list[tuple[str, int, int, _Record]] = []
        partitions = list(self._positions)
        if not partitions:
            return fetched
        self._next_start = (self._next_start + 1) % len(partitions)
        for topic, partition in partitions[self._next_start :] + partitions[: self._next_start]:
            log = self._bus._logs[topic][partition]
            start = self._positions[(topic, partition)]
            stop = min(len(log), start + self._max_poll_records - len(fetched))
            fetched += [(topic, partition, offset, log[offset]) for offset in range(start, stop)]
            self._positions[(topic, partition)] = stop
            if len(fetched) >= self._max_poll_records:
                break
        return fetched

    def _rebalance(self) -> None:
        """Recomputes this member's partitions; each one (re)starts at the group's committed offset."""
        self._epoch = self._bus._epoch
        positions = {}
        for topic, partition in self._bus._assignment(self):
            committed = self._bus._committed.get((self.group_id, topic, partition))
            if (topic, partition) in self._positions:
                positions[(topic, partition)] = self._positions[(topic, partition)]
            elif committed is not None:
                positions[(topic, partition)] = committed
            else:
                positions[(topic, partition)] = len(self._bus._logs[topic][partition]) if self._reset_to_end else 0
        self._positions = positions
