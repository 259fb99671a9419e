"""Online feature store: event-time sliding-window aggregates per key (SPEC 2.11).

For every ``(WindowSpec, key)`` the store keeps the key's recent events ``(ts, value[, distinct])`` and answers,
at a read time ``now``, for each window length ``w``: count, sum, mean, population std and (optionally) the number
of distinct values of the events with ``now - w < ts <= now``; plus the last ``spec.last_n`` retained events at
or before ``now`` (oldest first) and the time since the last of them.

Late-event policy. Each key remembers its largest event time ``max_ts``. An event with
``ts >= max_ts - spec.allowed_lateness`` is inserted in time order (after earlier events with the same ``ts``),
so reads see exactly what in-order arrival would have produced. An older event is rejected: ``update`` returns
False, nothing changes, and ``stats(spec).rejected_late`` counts it. Lateness is judged per key, so a quiet key
accepts whatever comes next.

Retention. Events with ``ts <= max_ts - max(windows) - allowed_lateness`` are evicted. Reads are therefore exact
for any ``now >= max_ts - allowed_lateness`` -- which covers every read that a stream in time order makes -- and
may miss evicted events for reads further in the past. Keys are never dropped as a whole.

Backends (``create_store(name, **options)``, registry ``FEATURE_STORE_BACKENDS``):
``memory`` (default, in-process, O(1) amortised update, O(log n) per window read; its per-event loops are
numba-compiled, and ``state_dict()`` / ``load_state_dict()`` save and restore it as plain numpy arrays) and
``redis`` (shared, one sorted set per key, Lua-scripted updates, pipelined batches; redis is its own durable
copy). Both return the same features for the same events (up to float rounding of sums).

Batches. ``read_before(spec, keys=..., ts=..., values=...)`` gives the point-in-time features of a stream of
events as numpy columns (a :class:`WindowBatch`): row ``i`` is read strictly before ``ts[i]``, then event ``i``
is folded in -- what a stream scorer and a training replay both need, without one result object per read. The
memory backend has a fast path for it; every backend gives the same numbers as read + update event by event.

Example::

    store = create_store("memory")
    card = WindowSpec(name="card", windows=(3600, 86400, 604800), last_n=16)
    store.update(card, "c1", ts=1000.0, value=25.0)
    feats = store.read(card, "c1", now=1500.0)   # feats.counts == (1, 1, 1), feats.time_since_last == 500.0
"""

from core.features.memory import MemoryFeatureStore
from core.features.redis_store import RedisFeatureStore
from core.features.store import FEATURE_STORE_BACKENDS, FeatureStore, Key, create_store
from core.features.windows import StoreStats, WindowBatch, WindowFeatures, WindowSpec, aggregate_events

__all__ = [
    "FEATURE_STORE_BACKENDS",
    "FeatureStore",
    "Key",
    "MemoryFeatureStore",
    "RedisFeatureStore",
    "StoreStats",
    "WindowBatch",
    "WindowFeatures",
    "WindowSpec",
    "aggregate_events",
    "create_store",
]
