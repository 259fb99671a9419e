"""The :class:`FeatureStore` interface, its backend registry and the ``create_store`` factory."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, cast

from core.features.windows import StoreStats, WindowBatch, WindowFeatures, WindowSpec
from core.utils.registry import Registry

__all__ = [
    "FeatureStore",
    "Key",
    "FEATURE_STORE_BACKENDS",
    "create_store",
    "check_batch",
    "check_read_before",
    "broadcast_now",
]

Key = str | int

FEATURE_STORE_BACKENDS: Registry[Callable[..., FeatureStore]] = Registry("feature store backend")


class FeatureStore(ABC):
    """Event-time sliding-window aggregates per (spec, key); see :mod:`core.features` for the semantics."""

    @abstractmethod
    def update(self, spec: WindowSpec, key: Key, *, ts: float, value: float, distinct: str | None = None) -> bool:
        """Fold one event into ``key``'s windows.

        Returns:
            True if inserted, False if rejected as later than ``spec.allowed_lateness`` (and counted).
        """

    @abstractmethod
    def update_many(
        self,
        spec: WindowSpec,
        *,
        keys: Sequence[Key],
        ts: Sequence[float],
        values: Sequence[float],
        distinct: Sequence[str] | None = None,
    ) -> int:
        """Fold events in the given order; same result as calling :meth:`update` on each. Returns how many went in."""

    @abstractmethod
    def read(self, spec: WindowSpec, key: Key, *, now: float) -> WindowFeatures:
        """Aggregates of ``key`` over events with ``now - w < ts <= now`` for every window ``w``."""

    @abstractmethod
    def read_many(self, spec: WindowSpec, *, keys: Sequence[Key], now: float | Sequence[float]) -> list[WindowFeatures]:
        """:meth:`read` for many keys, at one time or at one time per key."""

    def read_before(
        self,
        spec: WindowSpec,
        *,
        keys: Sequence[Key],
        ts: Sequence[float],
        values: Sequence[float] | None = None,
        distinct: Sequence[str] | None = None,
    ) -> WindowBatch:
        """Point-in-time features of a stream of events, as columns.

        Row ``i`` aggregates ``keys[i]``'s events strictly before ``ts[i]`` (a :meth:`read` at
        ``nextafter(ts[i], -inf)``). With ``values`` (and ``distinct`` when the spec tracks it), event ``i`` is
        folded in right after its own read, so later rows of the same key see it: the same state and results as
        alternating :meth:`read` and :meth:`update` event by event, which is what this default does. Backends
        override it with a faster path that gives the same numbers.
        """
        check_read_before(keys, ts=ts, values=values, distinct=distinct)
        rows = []
        for i, key in enumerate(keys):
            t = float(ts[i])
            rows.append(self.read(spec, key, now=math.nextafter(t, -math.inf)))
            if values is not None:
                self.update(spec, key, ts=t, value=values[i], distinct=None if distinct is None else distinct[i])
        return WindowBatch.from_features(spec, rows)

    @abstractmethod
    def stats(self, spec: WindowSpec) -> StoreStats:
        """Accepted and late-rejected event counts of ``spec`` since it was created or cleared."""

    @abstractmethod
    def clear(self, spec: WindowSpec) -> None:
        """Forget every key and counter of ``spec``."""

    def close(self) -> None:  # noqa: B027 -- optional hook; the memory backend holds nothing to release.
        """Release connections; the store is unusable afterwards."""


def create_store(name: str = "memory", **options: Any) -> FeatureStore:
    """Build a registered backend by name (``"memory"``, ``"redis"``) with its keyword options."""
    return FEATURE_STORE_BACKENDS.get(name)(**options)


def check_batch(
    keys: Sequence[Key],
    *,
    ts: Sequence[float],
    values: Sequence[float],
    distinct: Sequence[str] | None,
) -> None:
    """Raise a ValueError when the columns of a batch differ in length."""
    n = len(keys)
    lengths = {"ts": len(ts), "values": len(values)}
    if distinct is not None:
        lengths["distinct"] = len(distinct)
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ValueError(f"update_many: keys has {n} items but {bad} differ; pass one entry per event in every column")


def check_read_before(
    keys: Sequence[Key], *, ts: Sequence[float], values: Sequence[float] | None, distinct: Sequence[str] | None
) -> None:
    """Raise a ValueError when the columns of a ``read_before`` call differ in length."""
    if values is not None:
        check_batch(keys, ts=ts, values=values, distinct=distinct)
    elif len(ts) != len(keys):
        raise ValueError(f"read_before: keys has {len(keys)} items but ts has {len(ts)}; pass one time per key")


def broadcast_now(now: float | Sequence[float], n: int) -> Sequence[float]:
    """One read time per key: a scalar is repeated, a sequence must match the number of keys."""
    if isinstance(now, numbers.Real):  # numpy scalars included
        return [float(now)] * n
    times = cast(Sequence[float], now)  # numbers.Real does not narrow the union for mypy
    if len(times) != n:
        raise ValueError(f"read_many: got {n} keys but {len(times)} read times; pass one time or one per key")
    return times
