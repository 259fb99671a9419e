"""Event streaming (SPEC 2.11): one ``EventBus`` API over an in-process and a Kafka backend.

Build a bus with ``create_bus("memory")`` or ``create_bus("kafka", bootstrap_servers=...)``;
consume with at-least-once delivery and a dead-letter topic through :func:`run_consumer`.
"""

from core.streaming.bus import (
    BUS_BACKENDS,
    CommitError,
    Consumer,
    EventBus,
    PublishError,
    create_bus,
)
from core.streaming.consumer_loop import ConsumerStats, Handler, Rejection, dead_letter_topic_for, run_consumer
from core.streaming.events import Event, MalformedEventError, MalformedRecord, decode, encode

# Imported for their registration in BUS_BACKENDS.
from core.streaming import kafka_backend, memory_backend  # noqa: E402, F401  isort: skip

__all__ = [
    "BUS_BACKENDS",
    "CommitError",
    "Consumer",
    "ConsumerStats",
    "Event",
    "EventBus",
    "Handler",
    "MalformedEventError",
    "MalformedRecord",
    "PublishError",
    "Rejection",
    "create_bus",
    "dead_letter_topic_for",
    "decode",
    "encode",
    "run_consumer",
]
