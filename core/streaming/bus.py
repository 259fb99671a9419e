"""The event-bus API shared by every backend, and the factory that builds a bus by name.

Batch-oriented on purpose: ``publish`` is asynchronous and batched by the backend, ``poll`` returns
a list of events, and ``commit`` acknowledges everything returned so far. Consumers call ``commit``
only after processing (and after flushing anything they produced), which gives at-least-once
delivery; handlers must therefore be idempotent.

Example:
    >>> bus = create_bus("memory")
    >>> bus.publish("payments", {"amount": 12.5}, key="card-1")
    >>> with bus.consumer(["payments"], group_id="scorer") as consumer:
    ...     events = consumer.poll(timeout_ms=100)
    ...     consumer.commit()
    >>> events[0].value
    {'amount': 12.5}
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

from core.streaming.events import Event, Headers, MalformedEventError, MalformedRecord, decode, encode
from core.utils.registry import Registry

__all__ = [
    "BUS_BACKENDS",
    "AUTO_OFFSET_RESETS",
    "CommitError",
    "Consumer",
    "EventBus",
    "PublishError",
    "create_bus",
]

#: Backend name -> factory taking the backend's keyword options.
BUS_BACKENDS: Registry[Callable[..., EventBus]] = Registry("event bus backend")

#: Where a group with no committed offset starts reading.
AUTO_OFFSET_RESETS = ("earliest", "latest")

# Kafka's own rule for topic names (kafka.common.internals.Topic).
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class PublishError(RuntimeError):
    """Events could not be handed to the broker (unreachable broker, timeout, rejected record)."""


class CommitError(RuntimeError):
    """Offsets could not be committed, typically because the group rebalanced meanwhile.

    The uncommitted events will be delivered again (at-least-once), so callers may log and go on.
    """


def check_topic(name: object) -> str:
    """Returns ``name`` if it is a legal topic name, else raises ``ValueError`` saying why."""
    if not isinstance(name, str) or not _TOPIC_RE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(f"invalid topic name {name!r}: use 1-249 characters from [a-zA-Z0-9._-] (and not '.' or '..')")
    return name


def check_topics(topics: Sequence[str]) -> tuple[str, ...]:
    """Validates a list of topic names; a bare string (a classic slip) is rejected."""
    if isinstance(topics, str | bytes) or not topics:
        raise ValueError(f"topics must be a non-empty list of topic names, got {topics!r}")
    return tuple(check_topic(t) for t in topics)


def check_group_id(group_id: object) -> str:
    """Returns ``group_id`` if it is a non-empty string, else raises ``ValueError``."""
    if not isinstance(group_id, str) or not group_id:
        raise ValueError(f"group_id must be a non-empty string, got {group_id!r}")
    return group_id


def check_consumer_args(*, group_id: str, auto_offset_reset: str, max_poll_records: int) -> None:
    """Validates the arguments shared by every backend's ``consumer()``."""
    check_group_id(group_id)
    if auto_offset_reset not in AUTO_OFFSET_RESETS:
        raise ValueError(f"auto_offset_reset must be one of {AUTO_OFFSET_RESETS}, got {auto_offset_reset!r}")
    if not isinstance(max_poll_records, int) or max_poll_records < 1:
        raise ValueError(f"max_poll_records must be a positive int, got {max_poll_records!r}")


def check_batch_size(batch_size: object) -> int:
    """Returns ``batch_size`` if it is a positive int, else raises ``ValueError``."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_offsets(name: str, offsets: Mapping[int, int] | None) -> dict[int, int]:
    """Validates a ``{partition: offset}`` mapping given to ``read`` (``None`` means none given)."""
    if offsets is None:
        return {}
    if not isinstance(offsets, Mapping):
        raise ValueError(f"{name} must be a mapping {{partition: offset}}, got {type(offsets).__name__}")
    for partition, offset in offsets.items():
        for what, number in (("partition", partition), ("offset", offset)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ValueError(f"{name}: {what} must be a non-negative int, got {partition!r}: {offset!r}")
    return dict(offsets)


def read_bounds(
    topic: str,
    *,
    first: Mapping[int, int],
    last: Mapping[int, int],
    start: Mapping[int, int],
    end: Mapping[int, int],
) -> dict[int, tuple[int, int]]:
    """Per partition, the ``[from, to)`` offsets ``read`` covers, clamped to what the log holds.

    Args:
        topic: the topic read (for error messages).
        first: partition -> first offset still in the log.
        last: partition -> log end offset; a missing topic has no partitions and reads nothing.
        start: requested start offsets (partitions left out start at ``first``).
        end: requested end offsets, exclusive (partitions left out end at ``last``).

    Raises:
        ValueError: ``start`` or ``end`` names a partition the (existing) topic does not have.
    """
    if last:
        for name, given in (("start", start), ("end", end)):
            if unknown := sorted(set(given) - set(last)):
                raise ValueError(f"{name} names partitions {unknown} but topic {topic!r} has {sorted(last)}")
    # Clamping `to` at the log end is what guarantees `read` terminates instead of waiting for records.
    return {p: (max(first[p], start.get(p, first[p])), min(last[p], end.get(p, last[p]))) for p in sorted(last)}


def event_or_none(
    *, topic: str, partition: int, offset: int, key: str | None, raw: bytes | None, timestamp_ms: int, headers: Headers
) -> Event | None:
    """Decodes one record for ``read``; ``None`` for an undecodable one (the consumer loop dead-lettered it)."""
    try:
        value = decode(raw)
    except MalformedEventError:
        return None
    return Event(topic, key, value, offset, partition, timestamp_ms, headers)


def to_payload(value: Mapping[str, Any] | bytes) -> bytes:
    """Encodes a value for publishing; ``bytes`` pass through unchanged (e.g. forwarding raw records)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return encode(value)


class Consumer(ABC):
    """A member of a consumer group reading some topics.

    ``poll`` returns decoded events only; records whose payload is not a JSON object are kept aside
    and handed out by :meth:`take_malformed`, so one bad record never stops a consumer.
    """

    def __init__(self, topics: Sequence[str], *, group_id: str) -> None:
        self.topics = tuple(topics)
        self.group_id = group_id
        self._malformed: list[MalformedRecord] = []

    @abstractmethod
    def poll(self, timeout_ms: int = 1000) -> list[Event]:
        """Returns the next batch of events, waiting up to ``timeout_ms`` for one (may be empty)."""

    @abstractmethod
    def commit(self) -> None:
        """Commits the offsets of everything returned by ``poll`` so far (call after processing)."""

    @abstractmethod
    def close(self) -> None:
        """Leaves the group without committing; uncommitted events go to the next member."""

    @property
    def has_malformed(self) -> bool:
        """Whether ``poll`` set aside undecodable records not yet taken."""
        return bool(self._malformed)

    def take_malformed(self) -> list[MalformedRecord]:
        """Returns (and forgets) the undecodable records skipped by ``poll`` since the last call."""
        taken, self._malformed = self._malformed, []
        return taken

    def _to_event(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: str | None,
        raw: bytes | None,
        timestamp_ms: int,
        headers: Headers,
    ) -> Event | None:
        """Decodes one record; undecodable ones are set aside as :class:`MalformedRecord`."""
        try:
            value = decode(raw)
        except MalformedEventError as exc:
            self._malformed.append(
                MalformedRecord(topic, key, raw or b"", offset, partition, timestamp_ms, exc.reason, headers)
            )
            return None
        return Event(topic, key, value, offset, partition, timestamp_ms, headers)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus(ABC):
    """Publishes events to topics and hands out group consumers; one instance per process is typical."""

    @abstractmethod
    def publish(
        self,
        topic: str,
        value: Mapping[str, Any] | bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str | bytes] | None = None,
    ) -> None:
        """Queues one event; it is sent asynchronously (in batches) and guaranteed only after ``flush``.

        Args:
            topic: destination topic (created on first use if the broker allows it).
            value: a JSON-serialisable dict, or raw bytes sent as they are.
            key: partitioning key; events with one key keep their order.
            headers: extra record headers.
        """

    @abstractmethod
    def flush(self, timeout_s: float = 10) -> None:
        """Blocks until every queued event is acknowledged; raises :class:`PublishError` on failure."""

    @abstractmethod
    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 2000,
    ) -> Consumer:
        """Joins consumer group ``group_id`` reading ``topics``; offsets are committed explicitly."""

    @abstractmethod
    def end_offsets(self, topic: str) -> dict[int, int]:
        """Returns each partition's log end offset: the offset the next record written there will get.

        Args:
            topic: topic to look at.

        Returns:
            ``{partition: offset}``; empty when the topic does not exist.
        """

    @abstractmethod
    def committed(self, topic: str, *, group_id: str) -> dict[int, int]:
        """Returns the offsets consumer group ``group_id`` has committed on ``topic``, without joining it.

        Args:
            topic: topic to look at.
            group_id: the consumer group.

        Returns:
            ``{partition: offset}`` with 0 for partitions the group never committed; empty when the
            topic does not exist.
        """

    @abstractmethod
    def read(
        self,
        topic: str,
        *,
        start: Mapping[int, int] | None = None,
        end: Mapping[int, int] | None = None,
        batch_size: int = 2000,
    ) -> Iterator[list[Event]]:
        """Reads a range of a topic without joining a consumer group or committing anything.

        Used to rebuild state after a restart, e.g. replaying an input topic up to a group's
        :meth:`committed` offsets. Undecodable records are skipped: the consumer loop dead-lettered them.

        Args:
            topic: topic to read; a missing topic yields nothing.
            start: ``{partition: offset}`` to start from; partitions left out start at the beginning.
            end: ``{partition: offset}`` to stop before (exclusive); partitions left out stop at the
                log end as of this call. Offsets past the log end count as the log end.
            batch_size: most events per yielded batch.

        Yields:
            Non-empty batches of events; within a partition, events come in offset order.

        Raises:
            ValueError: a bad topic name, batch size, offset, or a partition the topic does not have.
        """

    @abstractmethod
    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Creates the topics that do not exist yet (idempotent)."""

    @abstractmethod
    def close(self) -> None:
        """Flushes pending events and releases connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_bus(backend: str = "memory", **options: Any) -> EventBus:
    """Builds an event bus by backend name.

    Args:
        backend: a name registered in :data:`BUS_BACKENDS` (``"memory"`` or ``"kafka"``).
        **options: backend options, e.g. ``bootstrap_servers="broker:9092"`` for Kafka.

    Raises:
        UnknownNameError: no backend has that name (the message lists the known ones).
    """
    return BUS_BACKENDS.get(backend)(**options)
