"""In-process feature store: per key, time-sorted arrays with prefix sums, read and written by compiled loops.

Why this layout: appends (the common, in-order case) are amortised O(1); every window read is two binary searches
plus prefix-sum differences, so it costs O(log n) whatever the window holds; eviction only moves a head index and
compacts a key once half of it is dead (amortised O(1)). The per-event loops run in numba
(:mod:`core.features.memory_kernels`); Python only maps keys and distinct values to integer ids and finishes the
columns in numpy, so a batch costs well under a microsecond per event and row.

A batch is checked before anything is stored: a bad event (non-finite time or value, a missing or unexpected
``distinct``) raises a ValueError naming it, and the store is left as it was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np

from core.features import memory_kernels as kernels
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

_KEY_ARRAY = numba.types.float64[:, ::1]


class _SpecState:
    """One spec's keys, interned distinct values and per-key arrays (layout in :mod:`core.features.memory_kernels`)."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self.windows = np.array(spec.windows, dtype=np.float64)
        # Window indices shortest first: nested windows let distinct counts grow one set instead of one per window.
        self.by_length = np.array(sorted(range(len(spec.windows)), key=spec.windows.__getitem__), dtype=np.int64)
        self.retention = spec.retention
        self.keys: dict[Key, int] = {}
        self.names: dict[str, int] = {}  # distinct value -> id
        self.name_array = np.empty(0, dtype=object)  # id -> distinct value
        self.data = numba.typed.List.empty_list(_KEY_ARRAY)
        self.ints = np.zeros((0, 2), dtype=np.int64)  # per key: length, head
        self.floats = np.zeros((0, 2), dtype=np.float64)  # per key: max_ts, shift
        self.stamp = np.zeros(0, dtype=np.int64)
        self.mark = np.zeros(1, dtype=np.int64)
        self.accepted = 0
        self.rejected_late = 0

    def ids(self, keys: Sequence[Key]) -> np.ndarray:
        """Key ids for reading; -1 for keys never inserted."""
        get = self.keys.get
        return np.fromiter([get(k, -1) for k in keys], dtype=np.int64, count=len(keys))

    def ids_creating(self, keys: Sequence[Key]) -> np.ndarray:
        """Key ids for inserting; new keys get the next ids in order of first appearance."""
        index = self.keys
        ids = np.fromiter([index.setdefault(k, len(index)) for k in keys], dtype=np.int64, count=len(keys))
        if len(index) > len(self.ints):
            grow = max(len(index), 2 * len(self.ints)) - len(self.ints)
            self.ints = np.concatenate([self.ints, np.zeros((grow, 2), dtype=np.int64)])
            self.floats = np.concatenate([self.floats, np.zeros((grow, 2), dtype=np.float64)])
        return ids

    def intern(self, distinct: Sequence[str]) -> np.ndarray:
        names = self.names
        ids = np.fromiter([names.setdefault(d, len(names)) for d in distinct], dtype=np.int64, count=len(distinct))
        if len(names) > len(self.name_array):
            new = list(names)[len(self.name_array) :]  # ids follow the dict's insertion order
            self.name_array = np.concatenate([self.name_array, np.array(new, dtype=object)])
        if len(names) > len(self.stamp):
            grow = max(len(names), 2 * len(self.stamp)) - len(self.stamp)
            self.stamp = np.concatenate([self.stamp, np.zeros(grow, dtype=np.int64)])
        return ids


@FEATURE_STORE_BACKENDS.register("memory")
class MemoryFeatureStore(FeatureStore):
    """Feature store in this process's memory (the default backend); not shared between processes."""

    _warm = False

    def __init__(self) -> None:
        self._specs: dict[str, _SpecState] = {}
        if not MemoryFeatureStore._warm:  # compile (or load from numba's cache) now, not on the first event
            MemoryFeatureStore._warm = True
            spec = WindowSpec(name="warm-up", windows=(1.0,), last_n=1, track_distinct=True)
            self.read_before(spec, keys=["k"], ts=[0.0], values=[0.0], distinct=["d"])
            self.clear(spec)

    def _state(self, spec: WindowSpec) -> _SpecState:
        st = self._specs.get(spec.name)
        if st is None:
            st = self._specs[spec.name] = _SpecState(spec)
        elif st.spec is not spec and st.spec != spec:
            raise ValueError(f"spec name {spec.name!r} is already used with {st.spec}; got {spec}")
        return st

    def update(self, spec: WindowSpec, key: Key, *, ts: float, value: float, distinct: str | None = None) -> bool:
        check_event(spec, ts, value, distinct)
        many = None if distinct is None else [distinct]
        return self.update_many(spec, keys=[key], ts=[ts], values=[value], distinct=many) == 1

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
        _, accepted = self._run(self._state(spec), keys, ts, values, distinct, nows=None)
        return accepted

    def read(self, spec: WindowSpec, key: Key, *, now: float) -> WindowFeatures:
        return self.read_many(spec, keys=[key], now=now)[0]

    def read_many(self, spec: WindowSpec, *, keys: Sequence[Key], now: float | Sequence[float]) -> list[WindowFeatures]:
        nows = np.asarray(broadcast_now(now, len(keys)), dtype=np.float64)
        batch, _ = self._run(self._state(spec), keys, nows, None, None, nows=nows)
        assert batch is not None
        return [batch.row(i) for i in range(len(batch))]

    def read_before(
        self,
        spec: WindowSpec,
        *,
        keys: Sequence[Key],
        ts: Sequence[float],
        values: Sequence[float] | None = None,
        distinct: Sequence[str] | None = None,
    ) -> WindowBatch:
        # One compiled pass: read each row just before its ts, then fold its event in. Means, stds and sums are
        # finished in numpy (_columns), the same float operations for every read path, so read_before equals
        # read() + update() event by event bit for bit.
        check_read_before(keys, ts=ts, values=values, distinct=distinct)
        t = np.asarray(ts, dtype=np.float64)
        batch, _ = self._run(self._state(spec), keys, t, values, distinct, nows=np.nextafter(t, -np.inf))
        assert batch is not None
        return batch

    def _run(
        self,
        st: _SpecState,
        keys: Sequence[Key],
        ts: Sequence[float] | np.ndarray,
        values: Sequence[float] | None,
        distinct: Sequence[str] | None,
        *,
        nows: np.ndarray | None,
    ) -> tuple[WindowBatch | None, int]:
        """Reads at ``nows`` (unless None) and inserts ``values`` (unless None), event by event, in one kernel call."""
        spec, n = st.spec, len(keys)
        t = np.asarray(ts, dtype=np.float64)
        insert = values is not None
        v = np.asarray(values, dtype=np.float64) if insert else t
        if insert:
            _check_events(spec, t, v, distinct)
        d = st.intern(distinct) if insert and distinct is not None else np.zeros(n, dtype=np.int64)
        ids = st.ids_creating(keys) if insert else st.ids(keys)
        out = kernels.read_insert(
            st.data, st.ints, st.floats, st.stamp, st.mark, ids, t if nows is None else nows, t, v, d,
            st.windows, st.by_length, spec.last_n, st.retention, spec.allowed_lateness, spec.track_distinct,
            nows is not None, insert,
        )  # fmt: skip
        accepted = int(out[-1])
        if insert:
            st.accepted += accepted
            st.rejected_late += n - accepted
        if nows is None:
            return None, accepted
        return _columns(st, *out[:-1]), accepted

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything the store holds, as numpy arrays (no pickled objects), for :meth:`load_state_dict`.

        Keys, distinct values, specs and counters travel as JSON in ``"meta"`` (keys keep their str / int type);
        per spec ``i``, ``"{i}.ints"``, ``"{i}.floats"`` and ``"{i}.events"`` hold the per-key arrays. Save it
        with ``numpy.savez`` and read it back with ``numpy.load(..., allow_pickle=False)``.
        """
        meta: list[dict[str, Any]] = []
        arrays: dict[str, np.ndarray] = {}
        for i, st in enumerate(self._specs.values()):
            n = len(st.data)
            fields = ("name", "windows", "last_n", "track_distinct", "allowed_lateness")
            meta.append(
                {
                    "spec": {f: getattr(st.spec, f) for f in fields},
                    "keys": list(st.keys),
                    "names": list(st.names),
                    "accepted": st.accepted,
                    "rejected_late": st.rejected_late,
                }
            )
            arrays[f"{i}.ints"], arrays[f"{i}.floats"] = st.ints[:n], st.floats[:n]
            arrays[f"{i}.events"] = kernels.pack(st.data, st.ints)
        arrays["meta"] = np.frombuffer(json.dumps({"version": 1, "specs": meta}).encode(), dtype=np.uint8)
        return arrays

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replaces the store's content with a :meth:`state_dict`; reads and updates then continue bit for bit."""
        meta = json.loads(bytes(np.asarray(state["meta"], dtype=np.uint8)))
        if meta.get("version") != 1:
            raise ValueError(f"feature store state version {meta.get('version')!r} is not supported (expected 1)")
        specs: dict[str, _SpecState] = {}
        for i, entry in enumerate(meta["specs"]):
            spec = WindowSpec(**entry["spec"])
            st = specs[spec.name] = _SpecState(spec)
            st.ints = np.array(state[f"{i}.ints"], dtype=np.int64).reshape(-1, 2)
            st.floats = np.array(state[f"{i}.floats"], dtype=np.float64).reshape(-1, 2)
            if not len(entry["keys"]) == len(st.ints) == len(st.floats):
                raise ValueError(f"feature store state: spec {spec.name!r} has inconsistent key arrays")
            kernels.unpack(np.ascontiguousarray(state[f"{i}.events"], dtype=np.float64), st.ints, st.data)
            st.keys = {k: j for j, k in enumerate(entry["keys"])}
            st.intern(entry["names"])
            st.accepted, st.rejected_late = int(entry["accepted"]), int(entry["rejected_late"])
        self._specs = specs

    def stats(self, spec: WindowSpec) -> StoreStats:
        st = self._state(spec)
        return StoreStats(accepted=st.accepted, rejected_late=st.rejected_late)

    def clear(self, spec: WindowSpec) -> None:
        self._specs.pop(spec.name, None)


def _check_events(spec: WindowSpec, ts: np.ndarray, values: np.ndarray, distinct: Sequence[str] | None) -> None:
    """Raise check_event's error for the first bad event of a batch (before any of it is stored)."""
    bad = ~(np.isfinite(ts) & np.isfinite(values))
    if bad.any():
        i = int(np.argmax(bad))
        check_event(spec, float(ts[i]), float(values[i]), None if distinct is None else distinct[i])
    if len(ts) and (distinct is None) == spec.track_distinct:
        check_event(spec, float(ts[0]), float(values[0]), None if distinct is None else distinct[0])
    if distinct is not None and any(d is None for d in distinct):
        check_event(spec, 0.0, 0.0, None)  # "tracks distinct values: pass distinct=<str> with every event"


def _columns(
    st: _SpecState,
    counts: np.ndarray,
    totals: np.ndarray,
    totals2: np.ndarray,
    distinct: np.ndarray,
    shifts: np.ndarray,
    since: np.ndarray,
    last_lengths: np.ndarray,
    last_ts: np.ndarray,
    last_values: np.ndarray,
    last_dist: np.ndarray,
) -> WindowBatch:
    """Finishes the kernel's columns: means, stds and sums from the shifted prefix-sum differences."""
    nf = counts.astype(np.float64)
    shift = shifts[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        m = totals / nf
        var = totals2 / nf - m * m
        stds = np.where((counts > 1) & (var > 0.0), np.sqrt(np.where(var > 0.0, var, 0.0)), 0.0)
    has = counts > 0
    track = st.spec.track_distinct
    return WindowBatch(
        counts=counts,
        sums=np.where(has, totals + nf * shift, 0.0),
        means=np.where(has, m + shift, 0.0),
        stds=stds,
        distinct=distinct if track else None,
        time_since_last=since,
        last_lengths=last_lengths,
        last_ts=last_ts,
        last_values=last_values,
        last_distinct=st.name_array[last_dist].tolist() if track else None,
    )
