"""Window semantics with hand-computed values, run against every feature-store backend."""

from __future__ import annotations

import math

import pytest

from core.features import FEATURE_STORE_BACKENDS, FeatureStore, WindowSpec, create_store
from core.utils.registry import UnknownNameError

HOUR = WindowSpec(name="hour", windows=(3600.0,), last_n=4, allowed_lateness=0.0)


def test_window_boundaries_are_open_at_the_old_end_and_closed_at_now(store: FeatureStore) -> None:
    for ts in (0.0, 100.0):
        store.update(HOUR, "k", ts=ts, value=1.0)
    assert store.read(HOUR, "k", now=50.0).counts == (1,)  # events after now are not seen
    store.update(HOUR, "k", ts=3600.0, value=1.0)
    assert store.read(HOUR, "k", now=3600.0).counts == (2,)  # ts=0 is exactly 3600 s old: out
    assert store.read(HOUR, "k", now=3699.0).counts == (2,)
    assert store.read(HOUR, "k", now=3700.0).counts == (1,)  # ts=100 leaves at 100 + 3600
    assert store.read(HOUR, "k", now=7199.0).counts == (1,)
    assert store.read(HOUR, "k", now=7200.0).counts == (0,)


def test_count_sum_mean_std_over_several_windows(store: FeatureStore) -> None:
    spec = WindowSpec(name="multi", windows=(10.0, 100.0), allowed_lateness=0.0)
    for ts, value in ((5.0, 60.0), (92.0, 10.0), (95.0, 20.0)):
        store.update(spec, "k", ts=ts, value=value)
    f = store.read(spec, "k", now=100.0)
    assert f.counts == (2, 3)
    assert f.sums == pytest.approx((30.0, 90.0))
    assert f.means == pytest.approx((15.0, 30.0))
    assert f.stds == pytest.approx((5.0, math.sqrt(1400.0 / 3.0)))


def test_empty_and_single_event_windows(store: FeatureStore) -> None:
    spec = WindowSpec(name="small", windows=(10.0,), last_n=2, allowed_lateness=0.0)
    empty = store.read(spec, "nobody", now=5.0)
    assert (empty.counts, empty.sums, empty.means, empty.stds) == ((0,), (0.0,), (0.0,), (0.0,))
    assert empty.last_values == () and empty.time_since_last == math.inf
    store.update(spec, "k", ts=1.0, value=1e9 + 0.5)
    one = store.read(spec, "k", now=4.0)
    assert one.counts == (1,) and one.means == pytest.approx((1e9 + 0.5,)) and one.stds == (0.0,)
    assert one.time_since_last == 3.0


def test_late_events_within_the_bound_are_inserted_in_order_older_ones_rejected(store: FeatureStore) -> None:
    spec = WindowSpec(name="late", windows=(1000.0,), last_n=8, allowed_lateness=100.0)
    assert store.update(spec, "k", ts=1000.0, value=1.0)
    assert store.update(spec, "k", ts=950.0, value=2.0)  # 50 s late: in
    assert not store.update(spec, "k", ts=899.0, value=3.0)  # 101 s late: out
    assert store.update(spec, "k", ts=900.0, value=4.0)  # exactly at the bound: in
    f = store.read(spec, "k", now=1000.0)
    assert f.last_ts == (900.0, 950.0, 1000.0)
    assert f.last_values == (4.0, 2.0, 1.0)
    assert f.sums == pytest.approx((7.0,))
    assert store.read(spec, "k", now=960.0).last_values == (4.0, 2.0)
    stats = store.stats(spec)
    assert (stats.accepted, stats.rejected_late) == (3, 1)
    assert store.update(spec, "other", ts=0.0, value=1.0)  # lateness is judged per key


def test_zero_lateness_keeps_equal_timestamps_in_arrival_order(store: FeatureStore) -> None:
    for value in (1.0, 2.0, 3.0):
        store.update(HOUR, "k", ts=10.0, value=value)
    assert not store.update(HOUR, "k", ts=9.999, value=9.0)
    assert store.read(HOUR, "k", now=10.0).last_values == (1.0, 2.0, 3.0)


def test_late_insert_between_equal_timestamps_goes_after_them(store: FeatureStore) -> None:
    spec = WindowSpec(name="ties", windows=(100.0,), last_n=8, allowed_lateness=50.0)
    for ts, value in ((10.0, 1.0), (20.0, 2.0), (10.0, 3.0), (15.0, 4.0)):
        store.update(spec, "k", ts=ts, value=value)
    f = store.read(spec, "k", now=20.0)
    assert f.last_ts == (10.0, 10.0, 15.0, 20.0) and f.last_values == (1.0, 3.0, 4.0, 2.0)
    assert f.sums == pytest.approx((10.0,)) and f.stds == pytest.approx((math.sqrt(1.25),))


def test_distinct_counts_per_window(store: FeatureStore) -> None:
    spec = WindowSpec(name="dist", windows=(10.0, 100.0), last_n=2, track_distinct=True, allowed_lateness=0.0)
    for ts, d in ((1.0, "a"), (50.0, "b"), (95.0, "a"), (96.0, "c")):
        store.update(spec, "k", ts=ts, value=1.0, distinct=d)
    f = store.read(spec, "k", now=100.0)
    assert f.distinct == (2, 3)
    assert f.last_distinct == ("a", "c")
    assert store.read(spec, "k", now=101.5).distinct == (2, 3)  # the "a" at ts=1 left, the one at ts=95 stays
    assert store.read(spec, "k", now=150.5).distinct == (0, 2)  # "b" left too


def test_last_n_returns_the_most_recent_events_oldest_first(store: FeatureStore) -> None:
    for i in range(6):
        store.update(HOUR, "k", ts=float(i), value=float(10 * i))
    f = store.read(HOUR, "k", now=5.0)
    assert f.last_ts == (2.0, 3.0, 4.0, 5.0) and f.last_values == (20.0, 30.0, 40.0, 50.0)
    assert store.read(HOUR, "k", now=1.5).last_values == (0.0, 10.0)


def test_keys_and_specs_are_independent(store: FeatureStore) -> None:
    other = WindowSpec(name="other", windows=(3600.0,), allowed_lateness=0.0)
    store.update(HOUR, "a", ts=1.0, value=1.0)
    store.update(HOUR, 7, ts=1.0, value=5.0)
    store.update(other, "a", ts=1.0, value=100.0)
    assert store.read(HOUR, "a", now=2.0).sums == (1.0,)
    assert store.read(HOUR, 7, now=2.0).sums == (5.0,)
    assert store.read(other, "a", now=2.0).sums == (100.0,)
    store.clear(HOUR)
    assert store.read(HOUR, "a", now=2.0).counts == (0,) and store.stats(HOUR).accepted == 0
    assert store.read(other, "a", now=2.0).counts == (1,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ts": math.nan, "value": 1.0}, "ts must be finite"),
        ({"ts": 1.0, "value": math.inf}, "value must be finite"),
        ({"ts": 1.0, "value": 1.0, "distinct": "x"}, "does not track distinct"),
    ],
)
def test_bad_events_raise_naming_the_field(store: FeatureStore, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.update(HOUR, "k", **kwargs)
    assert store.stats(HOUR).accepted == 0


def test_distinct_spec_requires_a_distinct_value(store: FeatureStore) -> None:
    spec = WindowSpec(name="needs", windows=(1.0,), track_distinct=True)
    with pytest.raises(ValueError, match="pass distinct="):
        store.update(spec, "k", ts=1.0, value=1.0)


def test_batch_columns_must_match(store: FeatureStore) -> None:
    with pytest.raises(ValueError, match="keys has 2 items"):
        store.update_many(HOUR, keys=["a", "b"], ts=[1.0], values=[1.0, 2.0])
    with pytest.raises(ValueError, match="2 keys but 3 read times"):
        store.read_many(HOUR, keys=["a", "b"], now=[1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "windows": (1.0,)}, "name"),
        ({"name": "a:b", "windows": (1.0,)}, "name"),
        ({"name": "x", "windows": ()}, "windows"),
        ({"name": "x", "windows": (0.0,)}, "windows"),
        ({"name": "x", "windows": (1.0,), "last_n": -1}, "last_n"),
        ({"name": "x", "windows": (1.0,), "allowed_lateness": -1.0}, "allowed_lateness"),
    ],
)
def test_window_spec_validates(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowSpec(**kwargs)


def test_registry_lists_backends_and_rejects_unknown_names() -> None:
    assert {"memory", "redis"} <= set(FEATURE_STORE_BACKENDS.names())
    with pytest.raises(UnknownNameError, match="known: .*memory.*redis"):
        create_store("cassandra")


def test_memory_rejects_one_name_for_two_different_specs() -> None:
    store = create_store("memory")
    store.update(HOUR, "k", ts=1.0, value=1.0)
    with pytest.raises(ValueError, match="already used"):
        store.read(WindowSpec(name="hour", windows=(60.0,)), "k", now=1.0)
