"""Backends agree with a brute-force reference and with each other; batches equal one-by-one calls; eviction."""

from __future__ import annotations

import math
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from core.features import FeatureStore, WindowFeatures, WindowSpec, aggregate_events, create_store

SPEC = WindowSpec(name="rand", windows=(50.0, 400.0, 1500.0), last_n=5, track_distinct=True, allowed_lateness=30.0)
# Windows out of length order: the memory backend counts distinct values shortest window first.
UNSORTED = WindowSpec(name="rand_unsorted", windows=(400.0, 50.0, 1500.0), track_distinct=True, allowed_lateness=30.0)

Event = tuple[str, float, float, str]


def _random_events(seed: int, n: int = 600) -> list[Event]:
    """Mostly in-order events on a few keys, with ties, jitter inside the lateness bound and some beyond it."""
    rng = random.Random(seed)
    events, clock = [], 0.0
    for _ in range(n):
        clock += rng.choice([0.0, rng.expovariate(1 / 8)])
        ts = clock - rng.choice([0.0, 0.0, rng.uniform(0, 29), rng.uniform(31, 80)])
        events.append((f"k{rng.randrange(4)}", round(ts, 3), round(rng.uniform(-50, 500), 2), rng.choice("abcde")))
    return events


def _reference(events: list[Event], spec: WindowSpec) -> tuple[dict[str, list[tuple[float, float, str]]], int]:
    """Accepted, retained events per key, sorted by time with ties in arrival order (policy in core.features)."""
    kept: dict[str, list[tuple[float, float, str]]] = {}
    max_ts: dict[str, float] = {}
    rejected = 0
    for key, ts, value, d in events:
        if key in max_ts and ts < max_ts[key] - spec.allowed_lateness:
            rejected += 1
            continue
        max_ts[key] = max(ts, max_ts.get(key, ts))
        rows = kept.setdefault(key, [])
        i = len(rows)
        while i and rows[i - 1][0] > ts:
            i -= 1
        rows.insert(i, (ts, value, d))
    # Retention, applied once at the end: late inserts never fall below the horizon, so this equals doing it live.
    retained = {key: [r for r in rows if r[0] > max_ts[key] - spec.retention] for key, rows in kept.items()}
    return retained, rejected


def _expected(rows: list[tuple[float, float, str]], now: float, spec: WindowSpec = SPEC) -> WindowFeatures:
    return aggregate_events(spec, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], now=now)


def _assert_same(got: WindowFeatures, want: WindowFeatures) -> None:
    assert got.counts == want.counts
    assert got.distinct == want.distinct
    assert got.last_ts == want.last_ts and got.last_values == want.last_values
    assert got.last_distinct == want.last_distinct
    assert got.time_since_last == pytest.approx(want.time_since_last)
    for field in ("sums", "means", "stds"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-9, abs=1e-6), field


@pytest.mark.parametrize(("seed", "spec"), [(0, SPEC), (1, SPEC), (2, UNSORTED)])
def test_backend_matches_the_reference_on_a_random_sequence(store: FeatureStore, seed: int, spec: WindowSpec) -> None:
    events = _random_events(seed)
    for key, ts, value, d in events:
        store.update(spec, key, ts=ts, value=value, distinct=d)
    kept, rejected = _reference(events, spec)
    latest = max(ts for _, ts, _, _ in events)
    # Every read time is >= each key's max_ts - allowed_lateness, where the stated policy promises exact answers.
    for now in (latest - spec.allowed_lateness, latest - 10.0, latest, latest + 60.0, latest + 1499.0):
        for key, rows in kept.items():
            _assert_same(store.read(spec, key, now=now), _expected(rows, now, spec))
    stats = store.stats(spec)
    assert stats.rejected_late == rejected > 0
    assert stats.accepted == len(events) - rejected


def test_batches_equal_one_by_one_calls(twin_stores: tuple[FeatureStore, FeatureStore]) -> None:
    batched, single = twin_stores
    events = _random_events(seed=2, n=300)
    keys, ts, values, distinct = (list(col) for col in zip(*events, strict=True))
    accepted = batched.update_many(SPEC, keys=keys, ts=ts, values=values, distinct=distinct)
    flags = [single.update(SPEC, k, ts=t, value=v, distinct=d) for k, t, v, d in events]
    assert accepted == sum(flags) == batched.stats(SPEC).accepted == single.stats(SPEC).accepted
    assert batched.stats(SPEC) == single.stats(SPEC)
    read_keys = ["k0", "k1", "k2", "k3", "missing"]
    nows = [max(ts) + 5.0 * i for i in range(len(read_keys))]
    many = batched.read_many(SPEC, keys=read_keys, now=nows)
    for key, now, got in zip(read_keys, nows, many, strict=True):
        _assert_same(got, single.read(SPEC, key, now=now))
    assert batched.read_many(SPEC, keys=read_keys, now=nows[0]) == [
        batched.read(SPEC, key, now=nows[0]) for key in read_keys
    ]


@pytest.mark.parametrize("spec", [SPEC, UNSORTED])
def test_read_before_equals_reading_then_updating_event_by_event(
    twin_stores: tuple[FeatureStore, FeatureStore], spec: WindowSpec
) -> None:
    columnar, single = twin_stores
    events = _random_events(seed=3, n=400)  # ties, late events and rejections included
    keys, ts, values, distinct = (list(col) for col in zip(*events, strict=True))
    first = columnar.read_before(spec, keys=keys[:150], ts=ts[:150], values=values[:150], distinct=distinct[:150])
    rest = columnar.read_before(spec, keys=keys[150:], ts=ts[150:], values=values[150:], distinct=distinct[150:])
    want = []
    for key, t, value, d in events:
        want.append(single.read(spec, key, now=math.nextafter(t, -math.inf)))
        single.update(spec, key, ts=t, value=value, distinct=d)
    assert len(first) + len(rest) == len(want)
    got = [first.row(i) for i in range(len(first))] + [rest.row(i) for i in range(len(rest))]
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)
    assert columnar.stats(spec) == single.stats(spec)
    # Without values it only reads: the state stays as it was.
    probe = columnar.read_before(spec, keys=["k0", "k0", "nope"], ts=[ts[-1] + 1.0] * 3)
    assert probe.row(0) == probe.row(1) and probe.row(2).counts == (0, 0, 0)
    assert columnar.stats(spec) == single.stats(spec)


def test_memory_read_before_is_bit_identical_to_the_generic_path() -> None:
    fast, generic = create_store("memory"), create_store("memory")
    events = _random_events(seed=4, n=500)
    keys, ts, values, distinct = (list(col) for col in zip(*events, strict=True))
    a = fast.read_before(SPEC, keys=keys, ts=ts, values=values, distinct=distinct)
    b = FeatureStore.read_before(generic, SPEC, keys=keys, ts=ts, values=values, distinct=distinct)
    for name in ("counts", "sums", "means", "stds", "distinct", "time_since_last", "last_lengths", "last_ts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.last_distinct == b.last_distinct and np.array_equal(a.last_values, b.last_values)


def test_read_before_checks_its_columns() -> None:
    store = create_store("memory")
    with pytest.raises(ValueError, match="ts has 1"):
        store.read_before(SPEC, keys=["a", "b"], ts=[1.0])
    with pytest.raises(ValueError, match="differ"):
        store.read_before(SPEC, keys=["a", "b"], ts=[1.0, 2.0], values=[1.0], distinct=["x", "y"])


def test_memory_eviction_keeps_the_state_bounded() -> None:
    store = create_store("memory")
    spec = WindowSpec(name="evict", windows=(100.0,), allowed_lateness=0.0)
    store.update_many(spec, keys=["k"] * 10_000, ts=[float(i) for i in range(10_000)], values=[1.0] * 10_000)
    state = store._specs["evict"]  # white-box: the point is what is no longer held
    k = state.keys["k"]
    length, head = state.ints[k]
    assert length - head == 100  # ts in (9899, 9999]
    assert length <= 2 * 100 + 32
    assert state.data[k].shape[1] <= 2 * (2 * 100 + 32) + 1  # capacity: at most double the bound, + the CUM slot
    feats = store.read(spec, "k", now=9999.0)
    assert feats.counts == (100,) and feats.sums == (100.0,) and feats.means == (1.0,)


@pytest.mark.redis
def test_redis_eviction_keeps_the_sorted_set_bounded(redis_url: str) -> None:
    spec = WindowSpec(name="evict", windows=(100.0,), allowed_lateness=10.0)
    prefix = f"keel-test:{uuid.uuid4().hex}"
    store = create_store("redis", url=redis_url, prefix=prefix)
    try:
        store.update_many(spec, keys=["k"] * 1000, ts=[float(i) for i in range(1000)], values=[2.0] * 1000)
        client = redis.Redis.from_url(redis_url)
        assert client.zcard(f"{prefix}:evict:k:ev") == 110  # ts in (999 - 110, 999]
        client.close()
        assert store.read(spec, "k", now=999.0).sums == (200.0,)
    finally:
        store.clear(spec)
        store.close()


def test_memory_state_dict_round_trip_continues_bit_for_bit(tmp_path: Path) -> None:
    events = _random_events(seed=5, n=500)  # late events, rejections and evictions included
    keys, ts, values, distinct = (list(col) for col in zip(*events, strict=True))
    keys[::7] = [7] * len(keys[::7])  # an int key too: it must come back as an int, not as "7"
    live = create_store("memory")
    live.read_before(SPEC, keys=keys[:300], ts=ts[:300], values=values[:300], distinct=distinct[:300])
    live.update_many(UNSORTED, keys=keys[:300], ts=ts[:300], values=values[:300], distinct=distinct[:300])
    np.savez(tmp_path / "state.npz", **live.state_dict())
    restored = create_store("memory")
    with np.load(tmp_path / "state.npz", allow_pickle=False) as state:
        restored.load_state_dict(state)
    for spec in (SPEC, UNSORTED):
        assert restored.stats(spec) == live.stats(spec)
        a, b = (
            s.read_before(spec, keys=keys[300:], ts=ts[300:], values=values[300:], distinct=distinct[300:])
            for s in (live, restored)
        )
        for name in ("counts", "sums", "means", "stds", "distinct", "time_since_last", "last_lengths", "last_ts"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.last_distinct == b.last_distinct and np.array_equal(a.last_values, b.last_values)
        assert restored.stats(spec) == live.stats(spec)
    assert restored.read(SPEC, 7, now=max(ts)) == live.read(SPEC, 7, now=max(ts))
    assert restored.read(SPEC, "7", now=max(ts)).counts == (0, 0, 0)


def test_memory_state_dict_refuses_an_unknown_version() -> None:
    state = create_store("memory").state_dict()
    state["meta"] = np.frombuffer(b'{"version": 9, "specs": []}', dtype=np.uint8)
    with pytest.raises(ValueError, match="version 9"):
        create_store("memory").load_state_dict(state)
