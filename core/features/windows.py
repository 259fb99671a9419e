"""Window specs, the features read from them, and the reference aggregation over a list of events.

Window semantics (both backends): at read time ``now`` the window of length ``w`` holds the events with
``now - w < ts <= now`` -- an event exactly ``w`` seconds old has just left, an event at ``now`` is in. Events
stamped after ``now`` are ignored, so a read at an older ``now`` sees the past as it was (within retention).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["WindowSpec", "WindowFeatures", "WindowBatch", "StoreStats", "aggregate_events", "check_event"]


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """What one family of windowed features keeps per key.

    Args:
        name: namespace of the keys (``"card"``, ``"terminal"``); two specs with one name share state.
        windows: window lengths in seconds, each > 0 (e.g. ``(3600, 86400, 604800)``).
        last_n: how many of the most recent events :meth:`FeatureStore.read` returns (0 for none).
        track_distinct: whether every event carries a ``distinct`` string whose distinct count per window is kept.
        allowed_lateness: seconds an event may lag behind its key's latest event time and still be inserted;
            older events are rejected and counted (see :mod:`core.features`).
    """

    name: str
    windows: tuple[float, ...]
    last_n: int = 0
    track_distinct: bool = False
    allowed_lateness: float = 60.0

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ValueError(f"WindowSpec.name must be a non-empty string without ':', got {self.name!r}")
        if not self.windows or any(not (math.isfinite(w) and w > 0) for w in self.windows):
            raise ValueError(f"WindowSpec.windows must be positive finite seconds, got {self.windows!r}")
        if self.last_n < 0:
            raise ValueError(f"WindowSpec.last_n must be >= 0, got {self.last_n}")
        if not (math.isfinite(self.allowed_lateness) and self.allowed_lateness >= 0):
            raise ValueError(f"WindowSpec.allowed_lateness must be >= 0 seconds, got {self.allowed_lateness!r}")
        object.__setattr__(self, "windows", tuple(float(w) for w in self.windows))

    @property
    def max_window(self) -> float:
        return max(self.windows)

    @property
    def retention(self) -> float:
        """Events older than ``key max ts - retention`` can never be read again at a valid ``now``; they go."""
        return self.max_window + self.allowed_lateness


@dataclass(frozen=True, slots=True)
class WindowFeatures:
    """Aggregates of one key at one read time; per-window tuples follow ``spec.windows``.

    ``means`` and ``stds`` (population) are 0.0 for an empty window; ``distinct`` is None unless the spec tracks
    it; ``last_*`` (oldest -> newest) and ``time_since_last`` (``math.inf`` if none) look at all retained events
    up to ``now``, not only those in a window: the key's events after ``max_ts - spec.retention``.
    """

    counts: tuple[int, ...]
    sums: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    distinct: tuple[int, ...] | None
    last_ts: tuple[float, ...]
    last_values: tuple[float, ...]
    last_distinct: tuple[str, ...] | None
    time_since_last: float


@dataclass(frozen=True, slots=True)
class WindowBatch:
    """The features of many reads as columns (row ``i`` is read ``i``), for batch consumers such as model inputs.

    Per-window columns are ``(B, len(spec.windows))``: ``counts`` and ``distinct`` int64, ``sums``, ``means`` and
    ``stds`` float64. ``time_since_last`` is ``(B,)`` (``inf`` for none). The last events of all rows are
    concatenated, oldest -> newest within a row: row ``i`` owns ``last_lengths[i]`` entries of ``last_ts``,
    ``last_values`` and ``last_distinct``, starting at ``last_lengths[:i].sum()``.
    """

    counts: np.ndarray
    sums: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    distinct: np.ndarray | None
    time_since_last: np.ndarray
    last_lengths: np.ndarray
    last_ts: np.ndarray
    last_values: np.ndarray
    last_distinct: list[str] | None

    def __len__(self) -> int:
        return len(self.time_since_last)

    @classmethod
    def from_features(cls, spec: WindowSpec, rows: Sequence[WindowFeatures]) -> WindowBatch:
        """Stack per-read results (what backends without a columnar path return) into columns."""
        w = len(spec.windows)

        def col(name: str, dtype: type) -> np.ndarray:
            return np.array([getattr(r, name) for r in rows], dtype=dtype).reshape(len(rows), w)

        last_distinct: list[str] | None = None
        if spec.track_distinct:
            last_distinct = [d for r in rows for d in r.last_distinct or ()]
        return cls(
            counts=col("counts", np.int64),
            sums=col("sums", np.float64),
            means=col("means", np.float64),
            stds=col("stds", np.float64),
            distinct=col("distinct", np.int64) if spec.track_distinct else None,
            time_since_last=np.array([r.time_since_last for r in rows], dtype=np.float64),
            last_lengths=np.array([len(r.last_ts) for r in rows], dtype=np.int64),
            last_ts=np.array([t for r in rows for t in r.last_ts], dtype=np.float64),
            last_values=np.array([v for r in rows for v in r.last_values], dtype=np.float64),
            last_distinct=last_distinct,
        )

    def row(self, i: int) -> WindowFeatures:
        """Read ``i`` as a :class:`WindowFeatures` (for tests and one-off use; the columns are the fast path)."""
        start = int(self.last_lengths[:i].sum())
        stop = start + int(self.last_lengths[i])
        return WindowFeatures(
            counts=tuple(int(c) for c in self.counts[i]),
            sums=tuple(float(v) for v in self.sums[i]),
            means=tuple(float(v) for v in self.means[i]),
            stds=tuple(float(v) for v in self.stds[i]),
            distinct=None if self.distinct is None else tuple(int(c) for c in self.distinct[i]),
            last_ts=tuple(float(t) for t in self.last_ts[start:stop]),
            last_values=tuple(float(v) for v in self.last_values[start:stop]),
            last_distinct=None if self.last_distinct is None else tuple(self.last_distinct[start:stop]),
            time_since_last=float(self.time_since_last[i]),
        )


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Events a store accepted and rejected as too late, for one spec."""

    accepted: int
    rejected_late: int


def check_event(spec: WindowSpec, ts: float, value: float, distinct: str | None) -> None:
    """Raise a ValueError naming the bad field of one event."""
    if not math.isfinite(ts):
        raise ValueError(f"feature event for {spec.name!r}: ts must be finite seconds, got {ts!r}")
    if not math.isfinite(value):
        raise ValueError(f"feature event for {spec.name!r}: value must be finite, got {value!r}")
    if spec.track_distinct and distinct is None:
        raise ValueError(f"spec {spec.name!r} tracks distinct values: pass distinct=<str> with every event")
    if not spec.track_distinct and distinct is not None:
        raise ValueError(f"spec {spec.name!r} does not track distinct values; set track_distinct=True to pass one")


def aggregate_events(
    spec: WindowSpec,
    ts: Sequence[float],
    values: Sequence[float],
    distinct: Sequence[str] | None,
    *,
    now: float,
) -> WindowFeatures:
    """Features at ``now`` from events sorted by time (ties in arrival order); events outside all windows are ok.

    This direct O(events) computation is the reference: the redis backend uses it on the events it fetches and
    the memory backend's prefix-sum path is tested against it.
    """
    hi = bisect_right(ts, now)
    counts, sums, means, stds, dist = [], [], [], [], []
    for w in spec.windows:
        lo = bisect_right(ts, now - w, 0, hi)
        vals = values[lo:hi]
        n = len(vals)
        total = math.fsum(vals)
        mean = total / n if n else 0.0
        var = math.fsum((v - mean) ** 2 for v in vals) / n if n else 0.0
        counts.append(n)
        sums.append(total)
        means.append(mean)
        stds.append(math.sqrt(var) if n > 1 else 0.0)
        if distinct is not None:
            dist.append(len(set(distinct[lo:hi])))
    first = max(0, hi - spec.last_n)
    return WindowFeatures(
        counts=tuple(counts),
        sums=tuple(sums),
        means=tuple(means),
        stds=tuple(stds),
        distinct=tuple(dist) if spec.track_distinct else None,
        last_ts=tuple(ts[first:hi]) if spec.last_n else (),
        last_values=tuple(values[first:hi]) if spec.last_n else (),
        last_distinct=(tuple(distinct[first:hi]) if spec.last_n else ()) if distinct is not None else None,
        time_since_last=now - ts[hi - 1] if hi else math.inf,
    )
