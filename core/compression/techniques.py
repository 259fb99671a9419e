"""The technique registry and :func:`compress`, the one entry point that runs any of them and reports.

Every technique is a function ``(model, ctx, **options) -> compressed model`` registered by name in
:data:`TECHNIQUES`; :func:`compress` runs one and measures before / after. Example::

    result = compress(model, "static_int8", example_input=x, calibration_data=loader, val_data=val_loader)
    small, report = result
    print(report.summary())
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.compression.casting import cast_weights, cluster_weights
from core.compression.distillation import distill
from core.compression.lowrank import LowRankSettings, factorize
from core.compression.pruning.channel import ChannelPruner
from core.compression.pruning.transformer import prune_transformer
from core.compression.pruning.unstructured import magnitude_prune, prune_gradually
from core.compression.quantization import quantize_dynamic, quantize_static, train_qat
from core.compression.report import CompressionResult, MetricFn, accuracy, build_report
from core.utils.registry import Registry

__all__ = ["CompressionContext", "TECHNIQUES", "compress", "finetune"]


@dataclass
class CompressionContext:
    """The data a technique may need, besides its own options.

    Attributes:
        example_input: one input batch (tracing, latency, shape checks).
        calibration_data: batches (tensors or ``(inputs, targets)``) for calibration / importance.
        train_data: a labelled Dataset or DataLoader for techniques that train (QAT, distillation,
            gradual pruning, fine-tuning after pruning).
        val_data: ``(inputs, targets)`` batches, passed to the Trainer for its validation loss.
        trainer_kwargs: extra :class:`core.training.Trainer` arguments (``checkpoint_dir``, ``precision``...).
    """

    example_input: torch.Tensor
    calibration_data: Iterable[Any] | None = None
    train_data: Any = None
    val_data: Any = None
    trainer_kwargs: dict[str, Any] | None = None


Technique = Callable[..., nn.Module]
TECHNIQUES: Registry[Technique] = Registry("compression technique")


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _need(ctx: CompressionContext, attr: str, technique: str) -> Any:
    value = getattr(ctx, attr)
    if value is None:
        raise ValueError(f"technique {technique!r} needs {attr} (see CompressionContext)")
    return value


def finetune(
    model: nn.Module, ctx: CompressionContext, *, epochs: int, lr: float = 1e-3, batch_size: int = 32
) -> nn.Module:
    """Trains ``model`` in place for ``epochs`` on ``ctx.train_data`` (cross-entropy) through the Trainer."""
    from core.training import Trainer

    kwargs = {"progress": False, **(ctx.trainer_kwargs or {})}
    train = _need(ctx, "train_data", "fine-tuning")
    Trainer(model.train(), loss_fn=_ce, lr=lr, **kwargs).train(
        train, val=ctx.val_data, epochs=epochs, batch_size=batch_size
    )
    # the Trainer may leave conv weights channels-last (its speed default); quantisation and export expect NCHW
    return model.to(memory_format=torch.contiguous_format).eval()


@TECHNIQUES.register("channel_pruning")
def _channel_pruning(
    model: nn.Module,
    ctx: CompressionContext,
    *,
    pruning_rate: float = 0.5,
    metric: str = "l1",
    round_to: int = 1,
    finetune_epochs: int = 0,
    lr: float = 1e-3,
) -> nn.Module:
    pruner = ChannelPruner(
        model,
        pruning_rate,
        metric,
        example_input=ctx.example_input,
        calibration_data=ctx.calibration_data,
        round_to=round_to,
    )
    pruned = pruner.prune()
    return finetune(pruned, ctx, epochs=finetune_epochs, lr=lr) if finetune_epochs > 0 else pruned


@TECHNIQUES.register("transformer_pruning")
def _transformer_pruning(
    model: nn.Module,
    ctx: CompressionContext,
    *,
    target: float = 0.3,
    steps: int = 3,
    epochs: int = 1,
    drop_layers: int = 0,
    prune_hidden: bool = True,
    temperature: float = 2.0,
    alpha: float = 0.5,
    lr: float = 5e-4,
    batch_size: int = 32,
) -> nn.Module:
    """Heads / FFN neurons / hidden size (and ``drop_layers`` layers) down to ``target`` x the parameters, in
    ``steps``; each step is distilled from ``model`` for ``epochs`` when ``ctx.train_data`` is given."""
    calib = list(_need(ctx, "calibration_data", "transformer_pruning"))
    return prune_transformer(
        model, target=target, calibration_data=calib, train_data=ctx.train_data, steps=steps, epochs=epochs,
        drop_layers=drop_layers, prune_hidden=prune_hidden, example_input=ctx.example_input, temperature=temperature,
        alpha=alpha, lr=lr, batch_size=batch_size, **(ctx.trainer_kwargs or {}),
    )  # fmt: skip


@TECHNIQUES.register("magnitude_pruning")
def _magnitude_pruning(
    model: nn.Module, ctx: CompressionContext, *, sparsity: float = 0.5, epochs: int = 0, lr: float = 1e-4
) -> nn.Module:
    if epochs <= 0:
        return magnitude_prune(model, sparsity)
    train = _need(ctx, "train_data", "magnitude_pruning with epochs > 0")
    return prune_gradually(
        model, train, sparsity=sparsity, epochs=epochs, val_data=ctx.val_data, lr=lr, **(ctx.trainer_kwargs or {})
    )


@TECHNIQUES.register("dynamic_int8")
def _dynamic_int8(model: nn.Module, ctx: CompressionContext) -> nn.Module:
    return quantize_dynamic(model)


@TECHNIQUES.register("static_int8")
def _static_int8(model: nn.Module, ctx: CompressionContext, *, max_batches: int | None = 32) -> nn.Module:
    data = _need(ctx, "calibration_data", "static_int8")
    return quantize_static(model, calibration_data=data, example_input=ctx.example_input, max_batches=max_batches)


@TECHNIQUES.register("qat")
def _qat(model: nn.Module, ctx: CompressionContext, *, epochs: int = 1, lr: float = 1e-4) -> nn.Module:
    train = _need(ctx, "train_data", "qat")
    return train_qat(
        model,
        train,
        example_input=ctx.example_input,
        val_data=ctx.val_data,
        epochs=epochs,
        lr=lr,
        **(ctx.trainer_kwargs or {}),
    )


@TECHNIQUES.register("distillation")
def _distillation(
    model: nn.Module,
    ctx: CompressionContext,
    *,
    student: nn.Module,
    feature_pairs: dict[str, str] | None = None,
    epochs: int = 1,
    temperature: float = 4.0,
    alpha: float = 0.5,
    lr: float = 1e-3,
) -> nn.Module:
    """``model`` is the teacher; the (smaller) ``student`` is trained and returned."""
    train = _need(ctx, "train_data", "distillation")
    return distill(
        student, model.eval(), train, example_input=ctx.example_input, val=ctx.val_data, feature_pairs=feature_pairs,
        temperature=temperature, alpha=alpha, epochs=epochs, lr=lr, **(ctx.trainer_kwargs or {}),
    ).eval()  # fmt: skip


@TECHNIQUES.register("low_rank")
def _low_rank(
    model: nn.Module,
    ctx: CompressionContext,
    *,
    energy: float = 0.9,
    max_rank_ratio: float = 0.5,
    finetune_epochs: int = 0,
    lr: float = 1e-4,
) -> nn.Module:
    small = factorize(model, LowRankSettings(energy=energy, max_rank_ratio=max_rank_ratio))
    return finetune(small, ctx, epochs=finetune_epochs, lr=lr) if finetune_epochs > 0 else small


@TECHNIQUES.register("fp16")
def _fp16(model: nn.Module, ctx: CompressionContext) -> nn.Module:
    return cast_weights(model, "fp16")


@TECHNIQUES.register("bf16")
def _bf16(model: nn.Module, ctx: CompressionContext) -> nn.Module:
    return cast_weights(model, "bf16")


@TECHNIQUES.register("weight_clustering")
def _weight_clustering(model: nn.Module, ctx: CompressionContext, *, n_clusters: int = 16) -> nn.Module:
    return cluster_weights(model, n_clusters)


def compress(
    model: nn.Module,
    technique: str,
    *,
    example_input: torch.Tensor,
    calibration_data: Iterable[Any] | None = None,
    train_data: Any = None,
    val_data: Iterable[Any] | None = None,
    metric_fn: MetricFn = accuracy,
    metric_name: str = "accuracy",
    batch_sizes: Sequence[int] = (1, 16),
    latency_repeats: int = 10,
    trainer_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> CompressionResult:
    """Runs ``technique`` (a name in :data:`TECHNIQUES`) on ``model`` and reports before / after.

    ``val_data`` (``(inputs, targets)`` batches) gives the report its metric; ``options`` go to the technique.
    """
    fn = TECHNIQUES.get(technique)
    ctx = CompressionContext(example_input, calibration_data, train_data, val_data, trainer_kwargs)
    try:
        compressed = fn(model, ctx, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"technique {technique!r}: {err}") from None
        raise
    return build_report(
        technique, model, compressed, example_input=example_input, settings=_jsonable(options), val_data=val_data,
        metric_fn=metric_fn, metric_name=metric_name, batch_sizes=batch_sizes, latency_repeats=latency_repeats,
    )  # fmt: skip


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | type(None) | dict | list) else repr(v)
        for k, v in options.items()
    }
