"""Backend-parametrized ``store`` fixture; the ``redis_url`` fixture comes from ``tests.fixtures.redis``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from core.features import FeatureStore, create_store


def make_store(name: str, request: pytest.FixtureRequest) -> Iterator[FeatureStore]:
    """A fresh store of backend ``name``; a redis one writes under a unique prefix that is deleted afterwards."""
    if name == "memory":
        yield create_store("memory")
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"keel-test:{uuid.uuid4().hex}"
    store = create_store("redis", url=url, prefix=prefix)
    try:
        yield store
    finally:
        store.close()
        client = redis.Redis.from_url(url)
        names = list(client.scan_iter(match=f"{prefix}:*"))
        if names:
            client.delete(*names)
        client.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> Iterator[FeatureStore]:
    yield from make_store(request.param, request)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def twin_stores(request: pytest.FixtureRequest) -> Iterator[tuple[FeatureStore, FeatureStore]]:
    """Two independent stores of one backend, to compare two ways of feeding the same events."""
    first, second = make_store(request.param, request), make_store(request.param, request)
    yield next(first), next(second)
    for gen in (first, second):
        next(gen, None)
