"""Fixtures for the event-bus tests: one ``bus`` fixture parametrized over both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.streaming import EventBus, create_bus


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus(request: pytest.FixtureRequest) -> Iterator[EventBus]:
    """An event bus of each registered backend (Kafka on the session's test broker)."""
    if request.param == "kafka":
        yield request.getfixturevalue("kafka_bus")
        return
    memory_bus = create_bus("memory")
    yield memory_bus
    memory_bus.close()
