"""Half-precision / bf16 weight casting and weight clustering (SPEC 2.6, technique 8).

* :func:`cast_weights` stores the weights in fp16 or bf16 (half the bytes) and wraps the model so it
  still takes and returns fp32 tensors: callers do not change. bf16 keeps fp32's range (safe for any
  model); fp16 keeps more mantissa but overflows above 65504.
* :func:`cluster_weights` replaces each Conv / Linear weight by the nearest of ``n_clusters`` shared
  values found by 1-D k-means (Han et al., "Deep Compression", 2016): the tensor stays dense fp32, but
  holds only ``n_clusters`` distinct values, so it compresses to ~log2(n_clusters) bits a weight (the
  report's zlib size shows it) and maps to palettised formats (Core ML, TFLite) directly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["CastModel", "cast_weights", "cluster_weights", "kmeans_1d"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CastModel(nn.Module):
    """Runs ``model`` in ``dtype``: floating inputs are cast down, floating outputs back to fp32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, *args: Any) -> Any:
        args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        out = self.model(*args)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def cast_weights(model: nn.Module, dtype: str = "bf16") -> CastModel:
    """A copy of ``model`` with every floating parameter and buffer in ``dtype`` (``"fp16"`` or ``"bf16"``)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return CastModel(copy.deepcopy(model).eval(), _DTYPES[dtype])


def kmeans_1d(values: torch.Tensor, n_clusters: int, *, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D tensor, centroids initialised evenly over [min, max] (Han et al.'s linear init).

    Returns (sorted centroids, index of each value's centroid).
    """
    v = values.detach().flatten().float()
    centroids = torch.linspace(float(v.min()), float(v.max()), n_clusters)
    for _ in range(iters):
        idx = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(n_clusters).index_add_(0, idx, v)
        counts = torch.zeros(n_clusters).index_add_(0, idx, torch.ones_like(v))
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
    return centroids, torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)


@torch.no_grad()
def cluster_weights(model: nn.Module, n_clusters: int = 16, *, min_numel: int = 1024) -> nn.Module:
    """A copy of ``model`` whose Conv / Linear weights (>= ``min_numel`` entries) each hold ``n_clusters`` values."""
    if not 2 <= n_clusters <= 65536:
        raise ValueError(f"n_clusters must be in [2, 65536], got {n_clusters}")
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) and m.weight.numel() >= min_numel:
            centroids, idx = kmeans_1d(m.weight, n_clusters)
            m.weight.copy_(centroids[idx].reshape(m.weight.shape).to(m.weight.dtype))
    return model
