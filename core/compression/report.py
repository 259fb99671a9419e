"""What every compression technique hands back: the model and a :class:`CompressionReport`.

The report compares the model before and after: parameters (and non-zero parameters, which is what
unstructured pruning changes), size on disk (the ``torch.save``-d ``state_dict``, and the same bytes
zlib-compressed, which is what pruning to zeros and weight clustering shrink), CPU latency at the batch
sizes asked for, and the metric on a validation set when one is given.
"""

from __future__ import annotations

import io
import statistics
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "CompressionReport",
    "CompressionResult",
    "ModelStats",
    "accuracy",
    "build_report",
    "count_parameters",
    "measure",
    "measure_latency",
    "size_on_disk",
]

MetricFn = Callable[[nn.Module, Iterable[Any]], float]


@dataclass(frozen=True)
class ModelStats:
    """Measurements of one model."""

    params: int
    nonzero_params: int
    size_bytes: int
    size_zlib_bytes: int
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median milliseconds
    metric: float | None = None


@dataclass(frozen=True)
class CompressionReport:
    """Before / after of one compression step."""

    technique: str
    settings: dict[str, Any]
    before: ModelStats
    after: ModelStats
    metric_name: str | None = None

    @property
    def metric_change(self) -> float | None:
        """after - before (negative: the compressed model scores lower)."""
        if self.before.metric is None or self.after.metric is None:
            return None
        return self.after.metric - self.before.metric

    @property
    def size_ratio(self) -> float:
        return self.before.size_bytes / max(1, self.after.size_bytes)

    def speedup(self, batch_size: int) -> float | None:
        b, a = self.before.latency_ms.get(batch_size), self.after.latency_ms.get(batch_size)
        return b / a if a and b else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric_change"] = self.metric_change
        d["size_ratio"] = self.size_ratio
        d["speedup"] = {bs: self.speedup(bs) for bs in self.after.latency_ms}
        return d

    def summary(self) -> str:
        parts = [
            f"{self.technique}: params {self.before.params:,} -> {self.after.params:,}",
            f"size {self.before.size_bytes / 1e6:.2f} -> {self.after.size_bytes / 1e6:.2f} MB",
        ]
        for bs in self.after.latency_ms:
            parts.append(
                f"latency@{bs} {self.before.latency_ms.get(bs, float('nan')):.1f} -> {self.after.latency_ms[bs]:.1f} ms"
            )
        if self.metric_change is not None:
            parts.append(f"{self.metric_name} {self.before.metric:.4f} -> {self.after.metric:.4f}")
        return "; ".join(parts)


@dataclass
class CompressionResult:
    """A compressed model and its report; unpacks as ``model, report = result``."""

    model: nn.Module
    report: CompressionReport

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.report))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, non-zero) parameter counts; packed int8 weights of quantised modules included."""
    total = nonzero = 0
    for t in _weights(model):
        total += t.numel()
        nonzero += int(torch.count_nonzero(t.int_repr() if t.is_quantized else t))
    return total, nonzero


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    for p in model.parameters():
        yield p.detach()
    for m in model.modules():  # quantised modules keep their weights packed, outside parameters()
        w = getattr(m, "weight", None)
        if callable(w) and not isinstance(w, nn.Module):  # unpacks a fresh tensor on every call
            w = w()
            if isinstance(w, torch.Tensor) and w.is_quantized:
                yield w
                b = m.bias() if callable(getattr(m, "bias", None)) else None  # type: ignore[operator]
                if isinstance(b, torch.Tensor):
                    yield b


def size_on_disk(model: nn.Module) -> tuple[int, int]:
    """Bytes of ``torch.save(model.state_dict())``, raw and zlib-compressed."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    raw = buf.getvalue()
    return len(raw), len(zlib.compress(raw, 6))


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 10,
    stat: str = "median",
) -> dict[int, float]:
    """Forward time in ms per batch size (``stat``: ``"median"`` or ``"min"`` of ``repeats`` runs), in inference
    mode on the current thread setting. ``"min"`` is the steadier figure on a machine other jobs share."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    out: dict[int, float] = {}
    model.eval()
    for bs in batch_sizes:
        x = _batch_of(example_input, bs)
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
        out[bs] = statistics.median(times) if stat == "median" else min(times)
    return out


def _batch_of(example: torch.Tensor, bs: int) -> torch.Tensor:
    reps = -(-bs // example.shape[0])
    return example.repeat(reps, *([1] * (example.ndim - 1)))[:bs].contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy over ``(inputs, targets)`` batches."""
    model.eval()
    correct = total = 0
    for x, y in data:
        pred = model(x).argmax(-1)
        correct += int((pred == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("validation data yielded no samples")
    return correct / total


def measure(
    model: nn.Module,
    *,
    example_input: torch.Tensor,
    val_data: Iterable[Any] | None = None,
    metric_fn: MetricFn = accuracy,
    batch_sizes: Sequence[int] = (1, 16),
    latency_repeats: int = 10,
    latency_stat: str = "median",
) -> ModelStats:
    """Parameters, size on disk, latency (skipped when ``batch_sizes`` is empty) and the metric."""
    params, nonzero = count_parameters(model)
    raw, packed = size_on_disk(model)
    latency = measure_latency(model, example_input, batch_sizes=batch_sizes, repeats=latency_repeats, stat=latency_stat)
    metric = metric_fn(model, val_data) if val_data is not None else None
    return ModelStats(params, nonzero, raw, packed, latency, metric)


def build_report(
    technique: str,
    original: nn.Module,
    compressed: nn.Module,
    *,
    example_input: torch.Tensor,
    settings: dict[str, Any] | None = None,
    val_data: Iterable[Any] | None = None,
    metric_fn: MetricFn = accuracy,
    metric_name: str = "accuracy",
    batch_sizes: Sequence[int] = (1, 16),
    latency_repeats: int = 10,
    compressed_input: torch.Tensor | None = None,
) -> CompressionResult:
    """Measures both models and returns the compressed one with its report.

    ``compressed_input``: the example input for the compressed model when it takes another dtype (fp16).
    """
    kw = {"val_data": val_data, "metric_fn": metric_fn, "batch_sizes": batch_sizes, "latency_repeats": latency_repeats}
    before = measure(original, example_input=example_input, **kw)  # type: ignore[arg-type]
    after_input = compressed_input if compressed_input is not None else example_input
    after = measure(compressed, example_input=after_input, **kw)  # type: ignore[arg-type]
    report = CompressionReport(technique, dict(settings or {}), before, after, metric_name if val_data else None)
    return CompressionResult(compressed, report)
