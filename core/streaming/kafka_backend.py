"""Kafka event bus on kafka-python (any Kafka-protocol broker: Apache Kafka, Redpanda, Tansu).

Values are (de)serialised here, not in kafka-python's serializer callbacks: a callback that raises
inside ``KafkaConsumer.poll`` loses the whole fetch, whereas decoding here turns one bad payload
into a dead-letter entry. Producer defaults favour throughput (5 ms linger, 256 KiB batches,
``acks=1``); pass ``acks="all"`` where losing an acknowledged event on broker failover matters.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

# kafka-python builds its protocol classes at import time with importlib.resources.read_text, which
# Python 3.11 deprecates; the warning names importlib, not kafka, so only a filter on the message
# keeps `import core.streaming` clean where warnings are errors (the test suite).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(open|read)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError

from core.streaming.bus import (  # noqa: E402
    BUS_BACKENDS,
    CommitError,
    Consumer,
    EventBus,
    PublishError,
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
from core.streaming.events import Event, normalize_headers

__all__ = ["KafkaBus"]

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code

#: ``read`` gives up when no record arrives for this long although the range is not done.
_READ_STALL_S = 30.0
#: How long ``end_offsets`` waits for the fetch that confirms a partition's high watermark.
_PROBE_TIMEOUT_S = 10.0


@BUS_BACKENDS.register("kafka")
class KafkaBus(EventBus):
    """Event bus on a Kafka-protocol broker.

    Args:
        bootstrap_servers: ``"host:port"`` or a comma-separated list of them.
        acks: 0, 1 or ``"all"``: how many replicas must confirm a write before it counts as sent.
        linger_ms: how long the producer waits to fill a batch; larger trades latency for throughput.
        batch_size: producer batch size in bytes, per partition.
        compression_type: ``None``, ``"gzip"``, ``"lz4"``, ``"snappy"`` or ``"zstd"``.
        session_timeout_ms: consumer-group session timeout. A group join takes about half of it with
            kafka-python 3, so tests pass small values (6000) and production keeps the default.
        heartbeat_interval_ms: consumer heartbeat period, at most a third of the session timeout.
        client_id: name the broker sees in its logs and metrics.
        producer_options: extra ``KafkaProducer`` keyword arguments (override the ones above).
        consumer_options: extra ``KafkaConsumer`` keyword arguments (override the ones above).
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str = "localhost:9092",
        acks: int | str = 1,
        linger_ms: int = 5,
        batch_size: int = 256 * 1024,
        compression_type: str | None = None,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        client_id: str = "keel",
        producer_options: Mapping[str, Any] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if acks not in (0, 1, "all", -1):
            raise ValueError(f"acks must be 0, 1 or 'all', got {acks!r}")
        if heartbeat_interval_ms * 3 > session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({heartbeat_interval_ms}) must be at most a third of "
                f"session_timeout_ms ({session_timeout_ms})"
            )
        self.bootstrap_servers = bootstrap_servers
        common = {"bootstrap_servers": bootstrap_servers, "client_id": client_id}
        self._producer_config = {
            **common,
            "acks": acks,
            "linger_ms": linger_ms,
            "batch_size": batch_size,
            "compression_type": compression_type,
            **(producer_options or {}),
        }
        self._consumer_config = {
            **common,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            **(consumer_options or {}),
        }
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._send_errors: list[BaseException] = []
        self._valid_topics: set[str] = set()
        self._closed = False

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
        if topic not in self._valid_topics:  # validate each name once; publish is the hot path
            self._valid_topics.add(check_topic(topic))
        payload = to_payload(value)
        producer = self._producer or self._start_producer()
        try:
            future = producer.send(
                topic,
                value=payload,
                key=None if key is None else key.encode("utf-8"),
                headers=list(normalize_headers(headers)) or None,
            )
        except KafkaTimeoutError as exc:  # metadata for the topic never arrived within max_block_ms
            raise PublishError(
                f"could not publish to topic {topic!r} on {self.bootstrap_servers}: {exc}; "
                "is the broker up and may the topic be created?"
            ) from exc
        future.add_errback(self._send_errors.append)

    def flush(self, timeout_s: float = 10) -> None:
        if self._producer is not None:
            try:
                self._producer.flush(timeout=timeout_s)
            except KafkaTimeoutError as exc:
                raise PublishError(f"events not acknowledged within {timeout_s}s by {self.bootstrap_servers}") from exc
        if self._send_errors:
            errors, self._send_errors = self._send_errors, []
            raise PublishError(f"{len(errors)} event(s) failed to publish; first error: {errors[0]!r}")

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
        self._check_open()
        config = {
            **self._consumer_config,
            "group_id": group_id,
            "auto_offset_reset": auto_offset_reset,
            "max_poll_records": max_poll_records,
            "enable_auto_commit": False,  # at-least-once: the caller commits after processing
        }
        try:
            client = KafkaConsumer(*checked, **config)
        except KafkaError as exc:
            raise ConnectionError(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc
        return _KafkaGroupConsumer(client, checked, group_id=group_id)

    def end_offsets(self, topic: str) -> dict[int, int]:
        check_topic(topic)
        client = self._standalone_client()
        try:
            return _log_ends(client, _partitions(client, topic))
        finally:
            client.close(autocommit=False)

    def committed(self, topic: str, *, group_id: str) -> dict[int, int]:
        check_topic(topic)
        # A consumer that never subscribes never joins the group, so asking disturbs no member of it.
        client = self._standalone_client(group_id=check_group_id(group_id))
        try:
            return {tp.partition: client.committed(tp) or 0 for tp in _partitions(client, topic)}
        finally:
            client.close(autocommit=False)

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
        # Bounds are fixed now (the default end is the log end at this call); a second client reads
        # lazily, so a generator that is never iterated leaves no connection open.
        client = self._standalone_client()
        try:
            partitions = _partitions(client, topic)
            first = {tp.partition: o for tp, o in client.beginning_offsets(partitions).items()}
            last = _log_ends(client, partitions)
        finally:
            client.close(autocommit=False)
        bounds = read_bounds(topic, first=first, last=last, start=starts, end=ends)
        return self._read(topic, {p: b for p, b in bounds.items() if b[0] < b[1]}, batch_size)

    def _read(self, topic: str, bounds: dict[int, tuple[int, int]], batch_size: int) -> Iterator[list[Event]]:
        if not bounds:
            return
        client = self._standalone_client(max_poll_records=batch_size)
        try:
            stops = {TopicPartition(topic, p): stop for p, (_, stop) in bounds.items()}
            client.assign(list(stops))
            for tp in stops:
                client.seek(tp, bounds[tp.partition][0])
            last_progress = time.monotonic()
            while stops:
                events = _events_before(client.poll(timeout_ms=200, max_records=batch_size), stops)
                done = [tp for tp, stop in stops.items() if client.position(tp) >= stop]
                if done:
                    client.pause(*done)  # stop fetching past the range
                    for tp in done:
                        del stops[tp]
                if events or done:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > _READ_STALL_S:
                    raise TimeoutError(
                        f"reading {topic!r}: no record from {self.bootstrap_servers} for {_READ_STALL_S}s "
                        f"with partitions {sorted(tp.partition for tp in stops)} unfinished; is the broker up?"
                    )
                if events:
                    yield events
        finally:
            client.close(autocommit=False)

    def _standalone_client(self, *, group_id: str | None = None, max_poll_records: int = 500) -> KafkaConsumer:
        """A consumer outside any group (or one that never joins ``group_id``), committing nothing."""
        self._check_open()
        config = {
            **self._consumer_config,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",  # a start offset already deleted by retention reads from the oldest
            "max_poll_records": max_poll_records,
        }
        try:
            return KafkaConsumer(**config)
        except KafkaError as exc:
            raise ConnectionError(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        if not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be a positive int, got {partitions!r}")
        new_topics = [NewTopic(check_topic(n), partitions, 1) for n in names]
        if not new_topics:
            return
        self._check_open()
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        except KafkaError as exc:
            raise ConnectionError(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc
        try:
            response = admin.create_topics(new_topics, raise_errors=False)
        finally:
            admin.close()
        failed = [t for t in response["topics"] if t["error_code"] not in (0, _TOPIC_ALREADY_EXISTS)]
        if failed:
            details = "; ".join(f"{t['name']}: error {t['error_code']} {t['error_message']}" for t in failed)
            raise RuntimeError(f"could not create topics on {self.bootstrap_servers}: {details}")

    def close(self) -> None:
        with self._lock:
            producer, self._producer, self._closed = self._producer, None, True
        if producer is not None:
            producer.close(timeout=10)  # close() flushes first
        if self._send_errors:
            errors = self._send_errors
            log.error("%d event(s) failed to publish before close; first error: %r", len(errors), errors[0])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this KafkaBus is closed; create a new one with create_bus('kafka', ...)")

    def _start_producer(self) -> KafkaProducer:
        """Creates the producer on first publish, so consume-only processes never open one."""
        with self._lock:
            self._check_open()
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(**self._producer_config)
                except KafkaError as exc:
                    raise PublishError(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc
            return self._producer


def _partitions(client: KafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, sorted; none for a missing topic (the metadata request creates nothing)."""
    return [TopicPartition(topic, p) for p in sorted(client.partitions_for_topic(topic))]


def _log_ends(client: KafkaConsumer, partitions: list[TopicPartition]) -> dict[int, int]:
    """Each partition's log end offset (the next offset to be written); leaves ``client`` assigned.

    Tansu 0.6 answers ListOffsets(latest) with the base offset of the last record *batch* plus one,
    short of the true end when that batch holds several records. The high watermark of a fetch is
    right on every broker, so the last listed record is fetched and the larger of the two is taken.
    """
    if not partitions:
        return {}
    listed = client.end_offsets(partitions)
    first = client.beginning_offsets(partitions)
    probe = [tp for tp in partitions if listed[tp] > first[tp]]
    if probe:
        client.assign(probe)
        for tp in probe:
            client.seek(tp, listed[tp] - 1)
        deadline = time.monotonic() + _PROBE_TIMEOUT_S
        while any(client.highwater(tp) is None for tp in probe) and time.monotonic() < deadline:
            client.poll(timeout_ms=100, max_records=1)
    highwater = {tp: client.highwater(tp) or 0 for tp in probe}
    return {tp.partition: max(listed[tp], highwater.get(tp, 0)) for tp in partitions}


def _events_before(fetched: Mapping[TopicPartition, list[Any]], stops: Mapping[TopicPartition, int]) -> list[Event]:
    """Decodes the fetched records that lie before their partition's stop offset."""
    events = []
    for tp, records in fetched.items():
        stop = stops.get(tp, 0)
        for rec in records:
            if rec.offset >= stop:
                break
            event = event_or_none(
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=None if rec.key is None else rec.key.decode("utf-8", errors="replace"),
                raw=rec.value,
                timestamp_ms=rec.timestamp,
                headers=tuple(rec.headers),
            )
            if event is not None:
                events.append(event)
    return events


class _KafkaGroupConsumer(Consumer):
    def __init__(self, client: KafkaConsumer, topics: Sequence[str], *, group_id: str) -> None:
        super().__init__(topics, group_id=group_id)
        self._client = client

    def poll(self, timeout_ms: int = 1000) -> list[Event]:
        batches = self._client.poll(timeout_ms=timeout_ms)
        events = []
        for records in batches.values():
            for rec in records:
                event = self._to_event(
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    key=None if rec.key is None else rec.key.decode("utf-8", errors="replace"),
                    raw=rec.value,
                    timestamp_ms=rec.timestamp,
                    headers=tuple(rec.headers),
                )
                if event is not None:
                    events.append(event)
        return events

    def commit(self) -> None:
        try:
            # Without arguments kafka-python commits the position after everything poll returned.
            self._client.commit()
        except CommitFailedError as exc:
            raise CommitError(
                f"commit for group {self.group_id!r} failed (group rebalanced?): {exc}; "
                "the uncommitted events will be delivered again"
            ) from exc

    def close(self) -> None:
        # autocommit=False: closing must not acknowledge events that were polled but not processed.
        self._client.close(autocommit=False)
