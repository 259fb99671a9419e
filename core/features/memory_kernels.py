"""The memory feature store's compiled loops: read a key's windows, insert an event, evict, count distinct values.

State of one spec, shared by every function here:

* ``data``: one ``(5, capacity + 1)`` float64 array per key id, rows ``TS``, ``VAL``, ``CUM``, ``CUM2``,
  ``DIST``. Entries ``[head, length)`` are the retained events in time order (ties in arrival order);
  ``CUM[j]`` is the sum of ``VAL - shift`` over entries ``[0, j)`` (``CUM2`` of its square), so a window sum is
  one difference; ``DIST`` holds interned distinct-value ids.
* ``ints[key] = (length, head)`` and ``floats[key] = (max_ts, shift)``; ``shift`` is the key's first value,
  so the variance ``E[x^2] - E[x]^2`` does not cancel catastrophically for large values.
* ``stamp`` / ``mark``: scratch for distinct counts (``stamp[d] == mark[0]`` means "seen in this read").

Appends are amortised O(1) (capacity doubles); a read is two binary searches per window plus prefix-sum
differences; eviction moves ``head`` and compacts once half of the entries are dead (and at least
``COMPACT_MIN``), exactly the policy of the list-based store this replaces, so the numbers are the same.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["COMPACT_MIN", "new_key_array", "pack", "read_insert", "unpack"]

TS, VAL, CUM, CUM2, DIST = 0, 1, 2, 3, 4
COMPACT_MIN = 32  # dead entries before compaction is worth a copy
_FIRST_CAPACITY = 8


@numba.njit(cache=True)
def new_key_array(capacity: int) -> np.ndarray:
    """An empty key: ``CUM[0] = CUM2[0] = 0``."""
    a = np.empty((5, capacity + 1), dtype=np.float64)
    a[CUM, 0] = 0.0
    a[CUM2, 0] = 0.0
    return a


@numba.njit(cache=True)
def _bisect_right(row: np.ndarray, x: float, lo: int, hi: int) -> int:
    while lo < hi:
        mid = (lo + hi) // 2
        if x < row[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


@numba.njit(cache=True)
def read_insert(  # noqa: PLR0913 -- a compiled kernel takes its state as arrays
    data,  # noqa: ANN001 -- numba.typed.List of (5, capacity + 1) float64 arrays
    ints: np.ndarray,
    floats: np.ndarray,
    stamp: np.ndarray,
    mark: np.ndarray,
    ids: np.ndarray,
    nows: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    dist: np.ndarray,
    windows: np.ndarray,
    by_length: np.ndarray,
    last_n: int,
    retention: float,
    lateness: float,
    track: bool,
    do_read: bool,
    do_insert: bool,
):  # noqa: ANN202 -- returns the raw columns, finished by MemoryFeatureStore
    """For each event ``i``: read key ``ids[i]`` at ``nows[i]`` (if ``do_read``), then insert it (if ``do_insert``).

    ``ids[i] == -1`` is a key never inserted (reads empty); an id equal to ``len(data)`` is created. Returns
    ``(counts, totals, totals2, distinct, shifts, since, last_lengths, last_ts, last_values, last_dist,
    accepted)``, where totals are sums of ``value - shift``.
    """
    n, w = ids.shape[0], windows.shape[0]
    rows = n if do_read else 0
    counts = np.zeros((rows, w), dtype=np.int64)
    totals = np.zeros((rows, w), dtype=np.float64)
    totals2 = np.zeros((rows, w), dtype=np.float64)
    distinct = np.zeros((rows, w), dtype=np.int64)
    shifts = np.zeros(rows, dtype=np.float64)
    since = np.full(rows, np.inf, dtype=np.float64)
    lengths = np.zeros(rows, dtype=np.int64)
    last_ts = np.empty(rows * last_n, dtype=np.float64)
    last_values = np.empty(rows * last_n, dtype=np.float64)
    last_dist = np.empty(rows * last_n, dtype=np.int64)
    los = np.empty(w, dtype=np.int64)
    used, accepted = 0, 0
    for i in range(n):
        k = ids[i]
        if do_read and 0 <= k < len(data):
            a, length, head = data[k], ints[k, 0], ints[k, 1]
            hi = _bisect_right(a[TS], nows[i], head, length)
            if hi > head:
                for j in range(w):
                    lo = _bisect_right(a[TS], nows[i] - windows[j], head, hi)
                    los[j] = lo
                    counts[i, j] = hi - lo
                    totals[i, j] = a[CUM, hi] - a[CUM, lo]
                    totals2[i, j] = a[CUM2, hi] - a[CUM2, lo]
                shifts[i] = floats[k, 1]
                since[i] = nows[i] - a[TS, hi - 1]
                if track:
                    _distinct_counts(a, los, hi, by_length, stamp, mark, distinct[i])
                if last_n > 0:
                    first = max(head, hi - last_n)
                    lengths[i] = hi - first
                    for j in range(first, hi):
                        last_ts[used] = a[TS, j]
                        last_values[used] = a[VAL, j]
                        last_dist[used] = np.int64(a[DIST, j])
                        used += 1
        if do_insert:
            if k == len(data):
                data.append(new_key_array(_FIRST_CAPACITY))
                ints[k, 0], ints[k, 1] = 0, 0
                floats[k, 0], floats[k, 1] = -np.inf, values[i]
            accepted += _insert(data, ints, floats, k, ts[i], values[i], dist[i], retention, lateness)
    return (
        counts,
        totals,
        totals2,
        distinct,
        shifts,
        since,
        lengths,
        last_ts[:used],
        last_values[:used],
        last_dist[:used],
        accepted,
    )


@numba.njit(cache=True)
def _distinct_counts(
    a: np.ndarray,
    los: np.ndarray,
    hi: int,
    by_length: np.ndarray,
    stamp: np.ndarray,
    mark: np.ndarray,
    out: np.ndarray,
) -> None:
    """Distinct values per window; a longer window starts earlier, so one "seen" set grows window by window."""
    mark[0] += 1
    m, seen, start = mark[0], 0, hi
    for j in by_length:
        lo = los[j]
        for e in range(lo, start):
            d = np.int64(a[DIST, e])
            if stamp[d] != m:
                stamp[d] = m
                seen += 1
        start = min(start, lo)
        out[j] = seen


@numba.njit(cache=True)
def _insert(  # noqa: PLR0913
    data,  # noqa: ANN001
    ints: np.ndarray,
    floats: np.ndarray,
    k: int,
    t: float,
    v: float,
    d: int,
    retention: float,
    lateness: float,
) -> int:
    """Inserts one event after the key's entries with ts <= t; 0 if it is later than the allowed lateness."""
    a, length, head, max_ts = data[k], ints[k, 0], ints[k, 1], floats[k, 0]
    in_order = t >= max_ts
    if in_order:  # the hot path
        pos = length
    elif t >= max_ts - lateness:
        pos = _bisect_right(a[TS], t, head, length)  # after equal timestamps: ties keep arrival order
    else:
        return 0
    if length + 1 == a.shape[1]:  # full: CUM needs length + 1 slots
        b = new_key_array(2 * length)
        b[:, : length + 1] = a[:, : length + 1]
        data[k] = a = b
    for j in range(length, pos, -1):
        a[TS, j], a[VAL, j], a[DIST, j] = a[TS, j - 1], a[VAL, j - 1], a[DIST, j - 1]
    a[TS, pos], a[VAL, pos], a[DIST, pos] = t, v, d
    x = v - floats[k, 1]
    for j in range(length + 1, pos, -1):  # only the (short) suffix of prefix sums moves
        a[CUM, j] = a[CUM, j - 1] + x
        a[CUM2, j] = a[CUM2, j - 1] + x * x
    ints[k, 0] = length = length + 1
    if in_order:
        floats[k, 0] = t
        horizon = t - retention
        if a[TS, head] <= horizon:
            _evict(a, ints, k, horizon, length, head)
    return 1


@numba.njit(cache=True)
def _evict(a: np.ndarray, ints: np.ndarray, k: int, horizon: float, length: int, head: int) -> None:
    h = _bisect_right(a[TS], horizon, head, length)
    ints[k, 1] = h
    if h < COMPACT_MIN or 2 * h < length:
        return
    live = length - h
    base, base2 = a[CUM, h], a[CUM2, h]
    for j in range(live):
        a[TS, j], a[VAL, j], a[DIST, j] = a[TS, h + j], a[VAL, h + j], a[DIST, h + j]
    for j in range(live + 1):
        a[CUM, j] = a[CUM, h + j] - base
        a[CUM2, j] = a[CUM2, h + j] - base2
    ints[k, 0], ints[k, 1] = live, 0


@numba.njit(cache=True)
def pack(data, ints: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Every key's used columns ``[0, length]`` side by side: ``(5, sum(length + 1))``, in key-id order."""
    total = 0
    for k in range(len(data)):
        total += ints[k, 0] + 1
    out = np.empty((5, total), dtype=np.float64)
    at = 0
    for k in range(len(data)):
        used = ints[k, 0] + 1
        out[:, at : at + used] = data[k][:, :used]
        at += used
    return out


@numba.njit(cache=True)
def unpack(packed: np.ndarray, ints: np.ndarray, data) -> None:  # noqa: ANN001
    """Appends to ``data`` one array per key from :func:`pack`'s layout (capacity: at least the first one's)."""
    at = 0
    for k in range(ints.shape[0]):
        used = ints[k, 0] + 1
        a = new_key_array(max(_FIRST_CAPACITY, 2 * (used - 1)))
        a[:, :used] = packed[:, at : at + used]
        data.append(a)
        at += used
