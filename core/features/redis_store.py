"""Redis feature store: one sorted set of events per (spec, key), shared by every process that talks to the server.

Layout (``P`` = prefix, ``S`` = spec name, ``K`` = key):
``P:S:K:ev`` sorted set, score = event time, member = ``<seq as 16 hex digits>:<repr(value)>:<distinct>`` (the
sequence keeps equal timestamps in arrival order, as the memory backend does, and makes every member unique);
``P:S:K:meta`` hash with the key's ``max_ts`` and ``seq``; ``P:S:stats`` hash with ``accepted`` / ``rejected_late``.
The lateness check, insertion, eviction and counting run in one Lua script, so concurrent writers cannot race.
Reads fetch the retained events up to ``now`` and aggregate them here with
:func:`core.features.windows.aggregate_events`. Batches go through pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from core.features.store import FEATURE_STORE_BACKENDS, FeatureStore, Key, broadcast_now, check_batch
from core.features.windows import StoreStats, WindowFeatures, WindowSpec, aggregate_events, check_event

__all__ = ["RedisFeatureStore"]

_BATCH = 2000  # commands per pipeline round trip: large enough to amortise latency, small enough for memory

# Numbers are handed to redis.call as the original strings or via %.17g: Redis would format Lua numbers with
# %.14g, losing sub-second precision of epoch timestamps.
_UPDATE_LUA = """
local ts = tonumber(ARGV[1])
local max_ts = tonumber(redis.call('HGET', KEYS[2], 'max_ts'))
if max_ts and ts < max_ts - tonumber(ARGV[4]) then
  redis.call('HINCRBY', KEYS[3], 'rejected_late', 1)
  return 0
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('ZADD', KEYS[1], ARGV[1], string.format('%016x', seq) .. ':' .. ARGV[2] .. ':' .. ARGV[3])
if not max_ts or ts > max_ts then
  max_ts = ts
  redis.call('HSET', KEYS[2], 'max_ts', ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', max_ts - tonumber(ARGV[5])))
redis.call('HINCRBY', KEYS[3], 'accepted', 1)
return 1
"""


@FEATURE_STORE_BACKENDS.register("redis")
class RedisFeatureStore(FeatureStore):
    """Feature store on a redis server.

    Args:
        url: redis URL, e.g. ``redis://127.0.0.1:6379/0``.
        prefix: namespace of every key this store writes (no ``:`` at the end).
        client: an existing ``redis.Redis`` to use instead of connecting to ``url``.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "keel:feat", client: Any = None):
        self._r = client if client is not None else redis.Redis.from_url(url)
        self._prefix = prefix
        self._update = self._r.register_script(_UPDATE_LUA)

    def _keys(self, spec: WindowSpec, key: Key) -> list[str]:
        base = f"{self._prefix}:{spec.name}:{key}"
        return [f"{base}:ev", f"{base}:meta", f"{self._prefix}:{spec.name}:stats"]

    def _args(self, spec: WindowSpec, ts: float, value: float, distinct: str | None) -> list[str]:
        check_event(spec, ts, value, distinct)
        return [repr(float(ts)), repr(float(value)), distinct or "", repr(spec.allowed_lateness), repr(spec.retention)]

    def update(self, spec: WindowSpec, key: Key, *, ts: float, value: float, distinct: str | None = None) -> bool:
        return bool(self._update(keys=self._keys(spec, key), args=self._args(spec, ts, value, distinct)))

    def update_many(
        self,
        spec: WindowSpec,
        *,
        keys: Sequence[Key],
        ts: Sequence[float],
        values: Sequence[float],
        distinct: Sequence[str] | None = None,
    ) -> int:
        check_batch(keys, ts=ts, values=values, distinct=distinct)
        accepted = 0
        for start in range(0, len(keys), _BATCH):
            pipe = self._r.pipeline(transaction=False)
            for i in range(start, min(start + _BATCH, len(keys))):
                d = distinct[i] if distinct is not None else None
                args = self._args(spec, float(ts[i]), float(values[i]), d)
                self._update(keys=self._keys(spec, keys[i]), args=args, client=pipe)
            accepted += sum(int(x) for x in pipe.execute())
        return accepted

    def read(self, spec: WindowSpec, key: Key, *, now: float) -> WindowFeatures:
        return self.read_many(spec, keys=[key], now=now)[0]

    def read_many(self, spec: WindowSpec, *, keys: Sequence[Key], now: float | Sequence[float]) -> list[WindowFeatures]:
        nows = broadcast_now(now, len(keys))
        out: list[WindowFeatures] = []
        for start in range(0, len(keys), _BATCH):
            pipe = self._r.pipeline(transaction=False)
            for key, t in zip(keys[start : start + _BATCH], nows[start : start + _BATCH], strict=True):
                # From -inf, not now - max window: last-N and time-since-last reach back over all retained events.
                pipe.zrangebyscore(self._keys(spec, key)[0], "-inf", repr(float(t)), withscores=True)
            for rows, t in zip(pipe.execute(), nows[start : start + _BATCH], strict=True):
                out.append(_aggregate(spec, rows, now=float(t)))
        return out

    def stats(self, spec: WindowSpec) -> StoreStats:
        raw = self._r.hgetall(f"{self._prefix}:{spec.name}:stats")
        return StoreStats(accepted=int(raw.get(b"accepted", 0)), rejected_late=int(raw.get(b"rejected_late", 0)))

    def clear(self, spec: WindowSpec) -> None:
        batch = []
        for name in self._r.scan_iter(match=f"{self._prefix}:{spec.name}:*", count=1000):
            batch.append(name)
            if len(batch) >= 1000:
                self._r.delete(*batch)
                batch.clear()
        if batch:
            self._r.delete(*batch)

    def close(self) -> None:
        self._r.close()


def _aggregate(spec: WindowSpec, rows: list[tuple[bytes, float]], *, now: float) -> WindowFeatures:
    ts, values, distinct = [], [], []
    for member, score in rows:
        _, value, dist = member.decode().split(":", 2)
        ts.append(score)
        values.append(float(value))
        distinct.append(dist)
    return aggregate_events(spec, ts, values, distinct if spec.track_distinct else None, now=now)
