"""The at-least-once consume loop: poll a batch, process it, dead-letter the bad events, flush, commit.

Commit comes last, so a crash anywhere before it means the batch is delivered again to the next
member of the group: handlers must be idempotent. A handler rejects single events in one of two
ways, and those events go to the dead-letter topic while the rest of the batch counts as processed:

* return a list of ``(event, reason)`` pairs (cheapest: one pass over the batch), or
* raise ``MalformedEventError(reason, event=event)``: the loop dead-letters that event and calls the
  handler again with the rest of the batch (fine for rare rejects, as handlers are idempotent).

Any other exception propagates: the consumer is closed without committing.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from core.streaming.bus import CommitError, Consumer, EventBus, check_topics
from core.streaming.events import Event, MalformedEventError, MalformedRecord

__all__ = ["ConsumerStats", "Handler", "Rejection", "dead_letter_topic_for", "run_consumer"]

log = logging.getLogger(__name__)

#: An event the handler refuses, with the reason recorded in the dead-letter topic.
Rejection = tuple[Event, str]
#: Processes one batch; returns the rejected events (or ``None`` when it accepts them all).
Handler = Callable[[list[Event]], Iterable[Rejection] | None]

#: Header names set on every dead-letter record (the payload repeats them for JSON-only readers).
DLQ_REASON, DLQ_TOPIC, DLQ_PARTITION, DLQ_OFFSET = (
    "keel.dlq.reason",
    "keel.dlq.topic",
    "keel.dlq.partition",
    "keel.dlq.offset",
)


@dataclass
class ConsumerStats:
    """What one :func:`run_consumer` call did.

    Attributes:
        processed: events the handler accepted.
        dead_lettered: events sent to a dead-letter topic (undecodable or rejected by the handler).
        batches: non-empty batches committed.
        elapsed_s: wall time of the loop, seconds.
    """

    processed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    elapsed_s: float = 0.0

    @property
    def events_per_s(self) -> float:
        """Throughput over the whole run (processed + dead-lettered)."""
        return (self.processed + self.dead_lettered) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def dead_letter_topic_for(topic: str) -> str:
    """The default dead-letter topic of ``topic``."""
    return f"{topic}.dlq"


def run_consumer(
    bus: EventBus,
    topics: Sequence[str],
    *,
    group_id: str,
    handler: Handler,
    dead_letter_topic: str | None = None,
    stop: threading.Event | None = None,
    max_events: int | None = None,
    idle_timeout_s: float | None = None,
    poll_timeout_ms: int = 500,
    auto_offset_reset: str = "earliest",
    max_poll_records: int = 2000,
) -> ConsumerStats:
    """Consumes ``topics`` as a member of ``group_id`` until told to stop, with at-least-once delivery.

    Args:
        bus: the event bus to read from and to dead-letter to.
        topics: topics to consume.
        group_id: consumer group; members of a group share the partitions and the committed offsets.
        handler: processes each batch; see the module docstring for how it rejects single events.
        dead_letter_topic: where bad events go; default ``"<source topic>.dlq"`` per source topic.
        stop: set it (from another thread) to end the loop after the current batch.
        max_events: end once this many events were handled; the last batch is finished, so a few
            more may be.
        idle_timeout_s: end after this long without any event.
        poll_timeout_ms: how long one poll waits for events.
        auto_offset_reset: where a group without committed offsets starts, "earliest" or "latest".
        max_poll_records: largest batch handed to ``handler``.

    Returns:
        Counts of processed and dead-lettered events, batches, and the elapsed time.
    """
    if max_events is not None and max_events < 1:
        raise ValueError(f"max_events must be a positive int or None, got {max_events!r}")
    topics = check_topics(topics)
    # Created up front: a broker without topic auto-creation would otherwise fail the first dead letter.
    bus.create_topics(sorted({dead_letter_topic or dead_letter_topic_for(t) for t in topics}))
    stats = ConsumerStats()
    start = idle_since = time.monotonic()
    consumer = bus.consumer(
        topics, group_id=group_id, auto_offset_reset=auto_offset_reset, max_poll_records=max_poll_records
    )
    with consumer:
        while not (stop is not None and stop.is_set()):
            if max_events is not None and stats.processed + stats.dead_lettered >= max_events:
                break
            events = consumer.poll(timeout_ms=poll_timeout_ms)
            if events or consumer.has_malformed:
                idle_since = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                break
            else:
                continue
            processed, dead = _process_batch(
                bus, consumer, handler=handler, events=events, dead_letter_topic=dead_letter_topic
            )
            stats.processed += processed
            stats.dead_lettered += dead
            stats.batches += 1
    stats.elapsed_s = time.monotonic() - start
    return stats


def _process_batch(
    bus: EventBus, consumer: Consumer, *, handler: Handler, events: list[Event], dead_letter_topic: str | None
) -> tuple[int, int]:
    """Handles one batch, dead-letters its bad events, flushes, then commits; returns (processed, dead)."""
    malformed = consumer.take_malformed()
    rejected = _handle(handler, events)
    for record in malformed:
        _dead_letter(bus, record, reason=record.reason, dead_letter_topic=dead_letter_topic)
    for event, reason in rejected:
        _dead_letter(bus, event, reason=reason, dead_letter_topic=dead_letter_topic)
    if malformed or rejected:  # one line per batch, not per event: a flood of bad input stays readable
        first = malformed[0].reason if malformed else rejected[0][1]
        log.warning("dead-lettered %d event(s); first reason: %s", len(malformed) + len(rejected), first)
    bus.flush()  # what the handler and the DLQ produced must be durable before we commit
    _commit(consumer)
    return len(events) - len(rejected), len(malformed) + len(rejected)


def _handle(handler: Handler, events: list[Event]) -> list[Rejection]:
    """Runs the handler over a batch and returns the events it rejected."""
    rejected: list[Rejection] = []
    remaining = events
    while remaining:
        try:
            result = handler(remaining)
        except MalformedEventError as exc:
            bad = exc.event
            if bad is None or not any(_same(bad, e) for e in remaining):
                raise  # cannot tell which event is bad: treat as a crash, the batch is redelivered
            rejected.append((bad, exc.reason))
            remaining = [e for e in remaining if not _same(bad, e)]
            continue
        rejected += _check_rejections(result)
        break
    return rejected


def _check_rejections(result: Iterable[Rejection] | None) -> list[Rejection]:
    if result is None:
        return []
    rejections = list(result)
    for item in rejections:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Event)):
            raise TypeError(f"a handler must return None or (event, reason) pairs, got an item {item!r}")
    return [(event, str(reason)) for event, reason in rejections]


def _same(a: Event, b: Event) -> bool:
    return (a.topic, a.partition, a.offset) == (b.topic, b.partition, b.offset)


def _dead_letter(bus: EventBus, item: Event | MalformedRecord, *, reason: str, dead_letter_topic: str | None) -> None:
    """Publishes a bad event with why it was refused and where it came from."""
    payload: dict[str, Any] = {
        "reason": reason,
        "topic": item.topic,
        "partition": item.partition,
        "offset": item.offset,
        "timestamp_ms": item.timestamp_ms,
        "key": item.key,
    }
    if isinstance(item, Event):
        payload["value"] = item.value
    else:  # keep the exact bytes (base64) and a readable rendering of them
        payload["raw_base64"] = base64.b64encode(item.raw).decode("ascii")
        payload["raw_text"] = item.raw.decode("utf-8", errors="replace")
    headers = {
        DLQ_REASON: reason,
        DLQ_TOPIC: item.topic,
        DLQ_PARTITION: str(item.partition),
        DLQ_OFFSET: str(item.offset),
    }
    topic = dead_letter_topic or dead_letter_topic_for(item.topic)
    log.debug("dead-lettering %s[%d]@%d to %s: %s", item.topic, item.partition, item.offset, topic, reason)
    bus.publish(topic, payload, key=item.key, headers=headers)


def _commit(consumer: Consumer) -> None:
    try:
        consumer.commit()
    except CommitError as exc:  # the batch will come again; at-least-once allows that
        log.warning("%s", exc)
