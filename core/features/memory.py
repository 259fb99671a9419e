"""In-process feature store: per key, time-sorted lists with prefix sums.

Why this layout: appends (the common, in-order case) are O(1) list appends; every window read is two binary
searches plus prefix-sum differences, so it costs O(log n) whatever the window holds; eviction only moves a head
index and compacts the lists once half of them is dead (amortised O(1)). Sums are kept of ``value - shift`` (the
key's first value) so the variance ``E[x^2] - E[x]^2`` does not cancel catastrophically for large values.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from core.features.store import (
    FEATURE_STORE_BACKENDS,
    FeatureStore,
    Key,
    broadcast_now,
    check_batch,
    check_read_before,
)
from core.features.windows import StoreStats, WindowBatch, WindowFeatures, WindowSpec, check_event

__all__ = ["MemoryFeatureStore"]

_COMPACT_MIN = 32  # dead entries before compaction is worth a list copy


class _KeyState:
    __slots__ = ("ts", "values", "cum", "cum2", "distinct", "head", "max_ts", "shift")

    def __init__(self, shift: float, *, track_distinct: bool) -> None:
        self.ts: list[float] = []
        self.values: list[float] = []
        self.cum: list[float] = [0.0]  # cum[i] = sum(values[:i] - shift)
        self.cum2: list[float] = [0.0]  # same for squares
        self.distinct: list[str] | None = [] if track_distinct else None
        self.head = 0  # entries before head are evicted
        self.max_ts = -math.inf
        self.shift = shift


class _SpecState:
    __slots__ = ("spec", "keys", "accepted", "rejected_late", "empty", "by_length", "retention")

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self.retention = spec.retention  # a property (a max over the windows); read on every insert
        # Window indices shortest first: nested windows let distinct counts grow one set instead of one per window.
        self.by_length = sorted(range(len(spec.windows)), key=spec.windows.__getitem__)
        self.keys: dict[Key, _KeyState] = {}
        self.accepted = 0
        self.rejected_late = 0
        zeros = (0.0,) * len(spec.windows)
        self.empty = WindowFeatures(
            counts=(0,) * len(spec.windows),
            sums=zeros,
            means=zeros,
            stds=zeros,
            distinct=(0,) * len(spec.windows) if spec.track_distinct else None,
            last_ts=(),
            last_values=(),
            last_distinct=() if spec.track_distinct else None,
            time_since_last=math.inf,
        )


@FEATURE_STORE_BACKENDS.register("memory")
class MemoryFeatureStore(FeatureStore):
    """Feature store in this process's memory (the default backend); not shared between processes."""

    def __init__(self) -> None:
        self._specs: dict[str, _SpecState] = {}

    def _state(self, spec: WindowSpec) -> _SpecState:
        st = self._specs.get(spec.name)
        if st is None:
            st = self._specs[spec.name] = _SpecState(spec)
        elif st.spec is not spec and st.spec != spec:
            raise ValueError(f"spec name {spec.name!r} is already used with {st.spec}; got {spec}")
        return st

    def update(self, spec: WindowSpec, key: Key, *, ts: float, value: float, distinct: str | None = None) -> bool:
        check_event(spec, ts, value, distinct)
        return _insert(self._state(spec), key, float(ts), float(value), distinct)

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
        st = self._state(spec)
        accepted = 0
        for i, key in enumerate(keys):
            d = distinct[i] if distinct is not None else None
            t, v = float(ts[i]), float(values[i])
            check_event(spec, t, v, d)
            accepted += _insert(st, key, t, v, d)
        return accepted

    def read(self, spec: WindowSpec, key: Key, *, now: float) -> WindowFeatures:
        st = self._state(spec)
        ks = st.keys.get(key)
        return st.empty if ks is None else _features(st, ks, float(now))

    def read_many(self, spec: WindowSpec, *, keys: Sequence[Key], now: float | Sequence[float]) -> list[WindowFeatures]:
        st = self._state(spec)
        nows = broadcast_now(now, len(keys))
        out = []
        for key, t in zip(keys, nows, strict=True):
            ks = st.keys.get(key)
            out.append(st.empty if ks is None else _features(st, ks, float(t)))
        return out

    def read_before(
        self,
        spec: WindowSpec,
        *,
        keys: Sequence[Key],
        ts: Sequence[float],
        values: Sequence[float] | None = None,
        distinct: Sequence[str] | None = None,
    ) -> WindowBatch:
        # The columnar fast path: per event only the binary searches and prefix-sum differences run in Python;
        # means, stds and sums are finished in numpy with the same float operations as _features, so the
        # numbers are identical to read() + update() event by event (the default this overrides).
        check_read_before(keys, ts=ts, values=values, distinct=distinct)
        st = self._state(spec)
        windows, last_n, track = spec.windows, spec.last_n, spec.track_distinct
        n_rows, n_win = len(keys), len(spec.windows)
        counts, totals, totals2 = [0] * (n_rows * n_win), [0.0] * (n_rows * n_win), [0.0] * (n_rows * n_win)
        distinct_counts = [0] * (n_rows * n_win) if track else None
        shifts, since, last_lengths = [0.0] * n_rows, [math.inf] * n_rows, [0] * n_rows
        last_ts: list[float] = []
        last_values: list[float] = []
        last_distinct: list[str] | None = [] if track else None
        states, by_length, nextafter, before_all = st.keys, st.by_length, math.nextafter, -math.inf
        for i, key in enumerate(keys):
            t = float(ts[i])
            ks = states.get(key)
            if ks is not None:
                now = nextafter(t, before_all)
                kts, head = ks.ts, ks.head
                hi = bisect_right(kts, now, head)
                if hi > head:
                    cum, cum2 = ks.cum, ks.cum2
                    top, top2, base = cum[hi], cum2[hi], i * n_win
                    los = []
                    for k, w in enumerate(windows):
                        lo = bisect_right(kts, now - w, head, hi)
                        los.append(lo)
                        counts[base + k] = hi - lo
                        totals[base + k] = top - cum[lo]
                        totals2[base + k] = top2 - cum2[lo]
                    shifts[i] = ks.shift
                    since[i] = now - kts[hi - 1]
                    if distinct_counts is not None:
                        distinct_counts[base : base + n_win] = _distinct_counts(ks.distinct, los, hi, by_length)  # type: ignore[arg-type]
                    if last_n:
                        first = max(head, hi - last_n)
                        last_lengths[i] = hi - first
                        last_ts += kts[first:hi]
                        last_values += ks.values[first:hi]
                        if last_distinct is not None:
                            last_distinct += ks.distinct[first:hi]  # type: ignore[index]
            if values is not None:
                d = distinct[i] if distinct is not None else None
                v = float(values[i])
                check_event(spec, t, v, d)
                _insert(st, key, t, v, d)
        return _columns(
            n_rows,
            n_win,
            counts,
            totals,
            totals2,
            shifts,
            distinct_counts,
            since,
            last_lengths,
            last_ts,
            last_values,
            last_distinct,
        )

    def stats(self, spec: WindowSpec) -> StoreStats:
        st = self._state(spec)
        return StoreStats(accepted=st.accepted, rejected_late=st.rejected_late)

    def clear(self, spec: WindowSpec) -> None:
        self._specs.pop(spec.name, None)


def _insert(st: _SpecState, key: Key, ts: float, value: float, distinct: str | None) -> bool:
    ks = st.keys.get(key)
    if ks is None:
        ks = st.keys[key] = _KeyState(value, track_distinct=st.spec.track_distinct)
    if ts >= ks.max_ts:  # in order: the hot path
        d = value - ks.shift
        ks.ts.append(ts)
        ks.values.append(value)
        ks.cum.append(ks.cum[-1] + d)
        ks.cum2.append(ks.cum2[-1] + d * d)
        if ks.distinct is not None:
            ks.distinct.append(distinct)  # type: ignore[arg-type]  # check_event guarantees a str here
        ks.max_ts = ts
        horizon = ts - st.retention
        if ks.ts[ks.head] <= horizon:
            _evict(ks, horizon)
    elif ts >= ks.max_ts - st.spec.allowed_lateness:
        _insert_late(ks, ts, value, distinct)
    else:
        st.rejected_late += 1
        return False
    st.accepted += 1
    return True


def _insert_late(ks: _KeyState, ts: float, value: float, distinct: str | None) -> None:
    # After equal timestamps, so ties keep arrival order; only the (short) suffix of prefix sums moves.
    i = bisect_right(ks.ts, ts, ks.head)
    d = value - ks.shift
    ks.ts.insert(i, ts)
    ks.values.insert(i, value)
    if ks.distinct is not None:
        ks.distinct.insert(i, distinct)  # type: ignore[arg-type]
    for cum, inc in ((ks.cum, d), (ks.cum2, d * d)):
        cum.insert(i + 1, cum[i] + inc)
        for j in range(i + 2, len(cum)):
            cum[j] += inc


def _evict(ks: _KeyState, horizon: float) -> None:
    ks.head = h = bisect_right(ks.ts, horizon, ks.head)
    if h < _COMPACT_MIN or 2 * h < len(ks.ts):
        return
    del ks.ts[:h], ks.values[:h]
    if ks.distinct is not None:
        del ks.distinct[:h]
    base, base2 = ks.cum[h], ks.cum2[h]
    ks.cum = [c - base for c in ks.cum[h:]]
    ks.cum2 = [c - base2 for c in ks.cum2[h:]]
    ks.head = 0


def _features(st: _SpecState, ks: _KeyState, now: float) -> WindowFeatures:
    spec = st.spec
    ts, cum, cum2, head, shift = ks.ts, ks.cum, ks.cum2, ks.head, ks.shift
    hi = bisect_right(ts, now, head)
    if hi == head:  # nothing retained up to now
        return st.empty
    top, top2 = cum[hi], cum2[hi]
    los, counts, sums, means, stds = [], [], [], [], []
    for w in spec.windows:
        lo = bisect_right(ts, now - w, head, hi)
        los.append(lo)
        n = hi - lo
        counts.append(n)
        if n:
            total = top - cum[lo]  # of value - shift
            m = total / n
            var = (top2 - cum2[lo]) / n - m * m
            sums.append(total + n * shift)
            means.append(m + shift)
            stds.append(math.sqrt(var) if n > 1 and var > 0.0 else 0.0)
        else:
            sums.append(0.0)
            means.append(0.0)
            stds.append(0.0)
    first = max(head, hi - spec.last_n)
    last = spec.last_n > 0
    distinct = ks.distinct
    return WindowFeatures(
        counts=tuple(counts),
        sums=tuple(sums),
        means=tuple(means),
        stds=tuple(stds),
        distinct=None if distinct is None else _distinct_counts(distinct, los, hi, st.by_length),
        last_ts=tuple(ts[first:hi]) if last else (),
        last_values=tuple(ks.values[first:hi]) if last else (),
        last_distinct=(tuple(distinct[first:hi]) if last else ()) if distinct is not None else None,
        time_since_last=now - ts[hi - 1],
    )


def _columns(
    n_rows: int,
    n_win: int,
    counts: list[int],
    totals: list[float],
    totals2: list[float],
    shifts: list[float],
    distinct_counts: list[int] | None,
    since: list[float],
    last_lengths: list[int],
    last_ts: list[float],
    last_values: list[float],
    last_distinct: list[str] | None,
) -> WindowBatch:
    """Finishes read_before's columns: the per-window arithmetic of _features, vectorised, in the same order."""
    n = np.array(counts, dtype=np.int64).reshape(n_rows, n_win)
    nf = n.astype(np.float64)
    total = np.array(totals, dtype=np.float64).reshape(n_rows, n_win)
    total2 = np.array(totals2, dtype=np.float64).reshape(n_rows, n_win)
    shift = np.array(shifts, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        m = total / nf
        var = total2 / nf - m * m
        stds = np.where((n > 1) & (var > 0.0), np.sqrt(np.where(var > 0.0, var, 0.0)), 0.0)
    has = n > 0
    return WindowBatch(
        counts=n,
        sums=np.where(has, total + nf * shift, 0.0),
        means=np.where(has, m + shift, 0.0),
        stds=stds,
        distinct=None if distinct_counts is None else np.array(distinct_counts, dtype=np.int64).reshape(n_rows, n_win),
        time_since_last=np.array(since, dtype=np.float64),
        last_lengths=np.array(last_lengths, dtype=np.int64),
        last_ts=np.array(last_ts, dtype=np.float64),
        last_values=np.array(last_values, dtype=np.float64),
        last_distinct=last_distinct,
    )


def _distinct_counts(distinct: list[str], los: list[int], hi: int, by_length: list[int]) -> tuple[int, ...]:
    """Distinct values per window; a longer window starts earlier, so one set grows window by window."""
    counts = [0] * len(los)
    seen: set[str] = set()
    start = hi
    for k in by_length:
        lo = los[k]
        if lo < start:
            seen.update(distinct[lo:start])
            start = lo
        counts[k] = len(seen)
    return tuple(counts)
