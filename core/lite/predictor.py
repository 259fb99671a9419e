"""Serving variable-length sequences with a lite model: pad each planned group to its own longest, then unpad.

With :class:`core.serving.ModelHandle`, the handle's micro-batcher collects concurrent requests (``max_delay_ms``),
a :class:`~core.lite.bucketing.TokenBudgetPlanner` splits them into similar-length groups under a token budget,
and :class:`SequencePredictor` runs each group::

    handle = ModelHandle.from_settings(
        settings,
        ref="encoder-onnx@production",
        load=sequence_loader(pad_value=0, pad_multiple=8),
        plan=TokenBudgetPlanner(max_tokens=4096, pad_multiple=8),
    )

Without a planner the whole collected batch is one group padded to its longest sequence (the usual behaviour).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from core.lite.bucketing import pad_batch, padded_length
from core.lite.runtime import LiteModel
from core.registry import ModelVersion

__all__ = ["PaddingStats", "SequencePredictor", "sequence_loader"]


@dataclass
class PaddingStats:
    """Tokens the model really saw versus the tokens its padded inputs held, over every call so far."""

    calls: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def efficiency(self) -> float:
        """``real / padded`` in (0, 1]: 1 means no padding at all."""
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


class SequencePredictor:
    """A :class:`core.serving.Predictor` for a lite model taking a padded ``(B, T, ...)`` sequence batch.

    Args:
        model: the loaded export.
        input_name: the sequence input (default: the model's only or first input).
        output_name: the output to return (default: the first).
        lengths_input: optional second input that receives the ``(B,)`` int64 true lengths.
        pad_value: the padding id / value the model masks out.
        pad_multiple: padded lengths are multiples of this (match the planner's).
        per_token: outputs are per position, ``(B, T, ...)``: each request gets its first ``L_i`` rows; otherwise
            each request gets its row ``(...)`` of a ``(B, ...)`` output.
    """

    def __init__(
        self,
        model: LiteModel,
        *,
        input_name: str | None = None,
        output_name: str | None = None,
        lengths_input: str | None = None,
        pad_value: float = 0,
        pad_multiple: int = 1,
        per_token: bool = False,
    ) -> None:
        meta = model.meta
        self.input_name = input_name or meta.inputs[0]
        self.output_name = output_name or meta.outputs[0]
        for what, name, known in (
            ("input", self.input_name, meta.inputs),
            ("input", lengths_input, meta.inputs),
            ("output", self.output_name, meta.outputs),
        ):
            if name is not None and name not in known:
                raise ValueError(f"the model has no {what} {name!r}; its {what}s: {known}")
        expected = {self.input_name, lengths_input} - {None}
        if set(meta.inputs) != expected:
            raise ValueError(f"the model takes inputs {meta.inputs}; a sequence predictor can feed only {expected}")
        self.model = model
        self.lengths_input = lengths_input
        self.pad_value = pad_value
        self.pad_multiple = pad_multiple
        self.per_token = per_token
        self.dtype = np.dtype(meta.input_dtypes.get(self.input_name, "float32"))
        self.stats = PaddingStats()
        self._stats_lock = threading.Lock()

    @property
    def version(self) -> ModelVersion | None:
        """The registry entry the model came from, if any."""
        return self.model.version

    def predict_batch(self, items: list[Any]) -> list[np.ndarray]:
        """Pads ``items`` (sequences of shape ``(L_i, ...)``) to their longest, runs the model once, unpads."""
        batch, lengths = pad_batch(items, pad_value=self.pad_value, pad_multiple=self.pad_multiple, dtype=self.dtype)
        feeds: dict[str, np.ndarray] = {self.input_name: batch}
        if self.lengths_input is not None:
            feeds[self.lengths_input] = lengths
        out = self.model.predict(feeds)[self.output_name]  # (B, ...) or (B, T, ...)
        if out.shape[0] != len(items):
            raise ValueError(f"output {self.output_name!r} has {out.shape[0]} rows for a batch of {len(items)}")
        with self._stats_lock:
            self.stats.calls += 1
            self.stats.real_tokens += int(lengths.sum())
            self.stats.padded_tokens += int(batch.shape[0] * batch.shape[1])
        if self.per_token:
            return [out[i, : lengths[i]].copy() for i in range(len(items))]
        return [out[i].copy() for i in range(len(items))]

    def measure_call_cost(self, sample: Sequence[Any], *, batch_size: int = 8, repeats: int = 5) -> float:
        """Measures the fixed cost of one model call in tokens, the ``call_cost`` of a token-budget planner.

        Times one call on a single median-length sequence of ``sample`` and one on ``batch_size`` copies of it, and
        solves ``time = a * (call_cost + tokens)`` (best of ``repeats`` each, so a busy machine biases it less).

        Returns:
            ``call_cost`` in tokens (>= 0); the counters in :attr:`stats` are left as they were.
        """
        if not sample or batch_size < 2:
            raise ValueError("measuring the call cost needs a non-empty sample and batch_size >= 2")
        seq = sorted(sample, key=len)[len(sample) // 2]
        length = padded_length(len(seq), self.pad_multiple)
        saved = replace(self.stats)
        one = _best_time(lambda: self.predict_batch([seq]), repeats)
        many = _best_time(lambda: self.predict_batch([seq] * batch_size), repeats)
        with self._stats_lock:  # in place: callers may hold a reference to the stats object
            self.stats.__dict__.update(saved.__dict__)
        per_token = max(many - one, 1e-12) / ((batch_size - 1) * length)
        return max(0.0, one / per_token - length)

    def predict_many(
        self, items: Sequence[Any], *, plan: Callable[[list[Any]], Sequence[Sequence[int]]] | None = None
    ) -> list[np.ndarray]:
        """Offline: runs ``items`` in the groups ``plan`` makes (one group without it); results in input order."""
        items = list(items)
        groups = plan(items) if plan is not None else [range(len(items))]
        results: list[np.ndarray | None] = [None] * len(items)
        for group in groups:
            for i, result in zip(group, self.predict_batch([items[i] for i in group]), strict=True):
                results[i] = result
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise ValueError(f"the plan left items {missing[:8]} unanswered")
        return [r for r in results if r is not None]


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first runs allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sequence_loader(*, threads: int | None = None, **predictor_kwargs: Any) -> Callable[..., SequencePredictor]:
    """The ``load`` hook for :class:`core.serving.ModelHandle` serving an exported sequence model.

    Args:
        threads: ONNX Runtime intra-op threads (``None``: its default).
        predictor_kwargs: passed to :class:`SequencePredictor` (``pad_value``, ``pad_multiple``, ``per_token`` ...).
    """

    def load(version: ModelVersion, state: Mapping[str, Any]) -> SequencePredictor:
        return SequencePredictor(LiteModel.from_state(version, state, threads=threads), **predictor_kwargs)

    return load
