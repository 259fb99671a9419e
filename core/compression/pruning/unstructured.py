"""Unstructured magnitude pruning, global and gradual (SPEC 2.6, technique 2).

Global: one magnitude threshold over every Conv / Linear weight at once, so layers with many small
weights lose more than sensitive ones (Han et al., 2015). Gradual: sparsity follows Zhu & Gupta's
cubic schedule ``s_t = s_f + (s_i - s_f) (1 - t / T)^3`` while the model trains, the mask recomputed
every ``frequency`` steps and re-applied after every optimizer step, as a Lightning callback for
:class:`core.training.Trainer`.

Zeros do not make a dense model faster; they make it smaller once compressed (the report's zlib size)
and feed sparse kernels or runtimes that exploit them.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradualMagnitudePruning", "cubic_sparsity", "magnitude_masks", "magnitude_prune", "prune_gradually"]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, _PRUNABLE)]


def magnitude_masks(model: nn.Module, sparsity: float) -> list[torch.Tensor]:
    """Boolean keep-masks (one per Conv/Linear weight) removing the ``sparsity`` smallest |w| globally."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    weights = _weights(model)
    if not weights:
        raise ValueError("the model has no Conv or Linear weights to prune")
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(sparsity * flat.numel())
    if k == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    threshold = flat.kthvalue(k).values
    return [w.detach().abs() > threshold for w in weights]


@torch.no_grad()
def _apply_masks(model: nn.Module, masks: list[torch.Tensor]) -> None:
    for w, mask in zip(_weights(model), masks, strict=True):
        w.mul_(mask)


def magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """One-shot global magnitude pruning of a copy of ``model`` (weights set to exactly zero)."""
    model = copy.deepcopy(model)
    _apply_masks(model, magnitude_masks(model, sparsity))
    return model


def cubic_sparsity(step: int, *, final: float, start_step: int, end_step: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): sparsity at ``step``, rising from ``initial`` to ``final`` between the two steps."""
    if step < start_step:
        return 0.0
    progress = min(1.0, (step - start_step) / max(1, end_step - start_step))
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualMagnitudePruning(pl.Callback):
    """Raises sparsity along :func:`cubic_sparsity` during training and keeps pruned weights at zero.

    Args:
        model: the ``nn.Module`` being trained (the one inside Keel's wrapper).
        final_sparsity: sparsity reached at ``end_step`` and kept after it.
        end_step: optimizer step where the final sparsity is reached (e.g. 70% of the run).
        start_step: first pruning step; frequency: steps between mask updates.
    """

    def __init__(
        self, model: nn.Module, *, final_sparsity: float, end_step: int, start_step: int = 0, frequency: int = 10
    ) -> None:
        if end_step <= start_step or frequency < 1:
            raise ValueError(
                f"need end_step > start_step and frequency >= 1, got {start_step}, {end_step}, {frequency}"
            )
        self.model = model
        self.final_sparsity = final_sparsity
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.masks: list[torch.Tensor] | None = None
        self.sparsity = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if (step >= self.start_step and (step - self.start_step) % self.frequency == 0) or step == self.end_step:
            target = cubic_sparsity(step, final=self.final_sparsity, start_step=self.start_step, end_step=self.end_step)
            if target > self.sparsity:
                self.sparsity = target
                self.masks = magnitude_masks(self.model, target)
        if self.masks is not None:
            _apply_masks(self.model, self.masks)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sparsity = self.final_sparsity
        self.masks = magnitude_masks(self.model, self.final_sparsity)
        _apply_masks(self.model, self.masks)


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def prune_gradually(
    model: nn.Module,
    train_data: Any,
    *,
    sparsity: float,
    epochs: int = 1,
    val_data: Any = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    loss_fn: Any = None,
    prune_fraction: float = 0.7,
    frequency: int = 10,
    **trainer_kwargs: Any,
) -> nn.Module:
    """Fine-tunes a copy of ``model`` through the Trainer while pruning it gradually to ``sparsity``.

    Sparsity ramps up over the first ``prune_fraction`` of the steps; the rest of the run recovers.
    """
    from core.training import Trainer

    model = copy.deepcopy(model).train()
    steps = epochs * -(-len(train_data) // batch_size) if hasattr(train_data, "__len__") else None
    if steps is None:
        raise ValueError("prune_gradually needs sized train_data (a Dataset) to plan its schedule")
    if isinstance(train_data, torch.utils.data.DataLoader):
        steps = epochs * len(train_data)
    callback = GradualMagnitudePruning(
        model, final_sparsity=sparsity, end_step=max(1, int(prune_fraction * steps)), frequency=frequency
    )
    trainer_kwargs.setdefault("progress", False)
    trainer = Trainer(model, loss_fn=loss_fn or _ce, lr=lr, callbacks=[callback], **trainer_kwargs)
    trainer.train(train_data, val=val_data, epochs=epochs, batch_size=batch_size)
    return model.to(memory_format=torch.contiguous_format)  # the Trainer may have left it channels-last
