"""Length bucketing under a token budget: batches of similar-length sequences instead of padding to the longest.

A batch of sequences costs what its padded tensor costs, ``count x longest``. Padding a batch of one 500-token
request and thirty 40-token ones to 500 spends most of the work on padding. :func:`plan_token_batches` sorts the
requests by length and cuts the sorted run into consecutive groups, each under a token budget, choosing the cuts
that minimise padding plus a per-call cost (token-budget batching after Fairseq's ``batch_by_size`` and Marian /
Tensor2Tensor, with the bucket boundaries chosen per batch instead of fixed): short requests share large calls,
long ones go out in small ones, and no request is padded far beyond its own length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TokenBudgetPlanner", "pad_batch", "padded_length", "plan_token_batches"]


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, at least ``multiple`` (an empty sequence takes a slot)."""
    return max(multiple, -(-length // multiple) * multiple)


def plan_token_batches(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    max_batch_size: int | None = None,
    pad_multiple: int = 1,
    call_cost: float = 32.0,
) -> list[list[int]]:
    """Groups sequence indices into model calls of similar length, each within the token budget.

    The sequences are sorted by length and the sorted run is cut into consecutive groups minimising the total cost
    ``sum over groups of (call_cost + len(group) * padded_length(longest in group))`` (an exact dynamic programme,
    O(n x largest group), vectorised). Padding is what grouping costs; ``call_cost`` is what one more model call
    costs, so sequences of equal length share a call while a 40-token request never waits in a 500-token batch.

    Args:
        lengths: length of each sequence.
        max_tokens: most padded tokens per group: ``len(group) * padded_length(longest in group)``. A sequence that
            alone exceeds it gets a group of its own (it must still be answered).
        max_batch_size: most sequences per group, whatever their length.
        pad_multiple: groups are padded to a multiple of this (e.g. 8, fewer distinct shapes).
        call_cost: fixed cost of one model call, in tokens (time of a call ~ ``a * (call_cost + B * T)``); larger
            values favour fewer, more padded calls. ``0`` splits whenever any padding would be saved.

    Returns:
        Groups of indices into ``lengths``, each index exactly once, ordered by their smallest index: the group of
        the oldest request runs first (first come, first served between groups: a long request is not pushed
        behind every later short one, which would make it the tail latency). Within a group, indices go from
        shortest to longest sequence (ties in input order).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    if call_cost < 0:
        raise ValueError(f"call_cost must be >= 0, got {call_cost}")
    bad = [(i, n) for i, n in enumerate(lengths) if int(n) < 0]
    if bad:
        raise ValueError(f"sequence lengths must be >= 0; index {bad[0][0]} has {bad[0][1]}")
    order = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))
    padded = [padded_length(int(lengths[i]), pad_multiple) for i in order]
    n, cap = len(order), max_batch_size or len(order)
    best = np.zeros(n + 1)  # best[j]: cheapest plan of the j shortest sequences
    start = np.zeros(n + 1, dtype=np.int64)  # where the last group of that plan starts
    for j in range(1, n + 1):
        longest = padded[j - 1]  # sorted: the last member is the group's longest
        lo = max(0, j - min(cap, max(1, max_tokens // longest)))
        costs = best[lo:j] + call_cost + (j - np.arange(lo, j)) * longest
        k = int(np.argmin(costs))  # first minimum: the largest group among equally cheap ones
        best[j], start[j] = costs[k], lo + k
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[start[j] : j])
        j = int(start[j])
    return sorted(groups, key=min)


@dataclass(frozen=True)
class TokenBudgetPlanner:
    """A batch planner for :class:`core.serving.MicroBatcher` / :class:`core.serving.ModelHandle` (``plan=``).

    Attributes:
        max_tokens: most padded tokens per model call (see :func:`plan_token_batches`).
        max_batch_size: most sequences per model call.
        pad_multiple: padded lengths are multiples of this; give the predictor the same value.
        call_cost: fixed cost of one model call in tokens (see :func:`plan_token_batches`).
        length: how long one request is (default ``len``).
    """

    max_tokens: int
    max_batch_size: int | None = None
    pad_multiple: int = 1
    call_cost: float = 32.0
    length: Callable[[Any], int] = len

    def __post_init__(self) -> None:  # fail fast on bad settings, at construction, not on the first batch
        self([])

    def __call__(self, items: Sequence[Any]) -> list[list[int]]:
        return plan_token_batches(
            [self.length(item) for item in items],
            max_tokens=self.max_tokens,
            max_batch_size=self.max_batch_size,
            pad_multiple=self.pad_multiple,
            call_cost=self.call_cost,
        )


def pad_batch(
    sequences: Sequence[Any], *, pad_value: float = 0, pad_multiple: int = 1, dtype: np.dtype | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stacks variable-length sequences into one right-padded array.

    Args:
        sequences: each of shape ``(L_i,)`` (token ids) or ``(L_i, F)`` (feature vectors); same trailing shape.
        pad_value: what fills the padding (the model's padding id).
        pad_multiple: the padded length is a multiple of this.
        dtype: dtype of the result (default: that of the first sequence).

    Returns:
        ``(batch, lengths)``: ``(B, T, ...)`` with ``T = padded_length(max L_i)``, and the ``(B,)`` int64 lengths.
    """
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    arrays = [np.asarray(s, dtype=dtype) for s in sequences]
    tail = arrays[0].shape[1:]
    for i, a in enumerate(arrays):
        if a.ndim == 0 or a.shape[1:] != tail:
            raise ValueError(f"sequence {i} has shape {a.shape}; every sequence must be (length, *{tail})")
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    width = padded_length(int(lengths.max()), pad_multiple)
    batch = np.full((len(arrays), width, *tail), pad_value, dtype=arrays[0].dtype)  # (B, T, ...)
    for row, a in enumerate(arrays):
        batch[row, : a.shape[0]] = a
    return batch, lengths
