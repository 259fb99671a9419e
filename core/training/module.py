"""The LightningModule Keel builds around a plain ``nn.Module`` and a ``loss_fn``.

Manual optimization, so that the LR scheduler advances only on optimizer steps that really
happened: a step the loss scaler skipped (inf/NaN gradients) leaves the schedule where it was
(the fix for Lightning-AI/pytorch-lightning#18828).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from core.training.callbacks import logging_step
from core.training.speed import channels_last_batch

__all__ = ["LossFn", "OptimConfig", "LossFnModule", "build_optimizer", "build_scheduler"]

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedule settings for a wrapped module."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    scheduler: str = "cosine"
    warmup_steps: int = 0
    fused: bool = False  # the single-kernel AdamW (the Trainer sets it from SpeedConfig.fused_adamw)


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; no decay on biases and norm weights (ndim < 2); with ``fused``, the single-kernel AdamW.

    ``fused`` applies where PyTorch has the kernel for every parameter's device (CUDA, CPU); the Trainer's
    speed plan asks for it on CUDA by default (``SpeedConfig.fused_adamw``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = fused and all(p.device.type in ("cuda", "cpu") for p in params)
    log.info("optimizer: AdamW(lr=%g, weight_decay=%g), fused=%s", lr, weight_decay, fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Linear warm-up then cosine decay to 0 over ``total_steps`` (``"cosine"``), or None (``"none"``)."""
    if name == "none":
        return None
    if name != "cosine":
        raise ValueError(f"scheduler must be 'cosine' or 'none', got {name!r}")
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossFnModule(pl.LightningModule):
    """Trains ``model`` by minimising ``loss_fn(model, batch)``; validation logs the same loss as ``val_loss``."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, *, optim: OptimConfig, channels_last_inputs: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.optim = optim
        self.channels_last_inputs = channels_last_inputs  # image batches -> NHWC on the device (SpeedConfig)
        # Set by Keel's Trainer from the loader length. Lightning's estimated_stepping_batches would
        # set the data up before a resumed checkpoint restores the loader's position.
        self.total_steps: int | None = None
        self.automatic_optimization = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _loss(self, batch: Any) -> torch.Tensor:
        if self.channels_last_inputs:
            batch = channels_last_batch(batch)
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = getattr(loss, "shape", "")
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} {shape}")
        return loss.reshape(())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self._loss(batch)
        opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        plugin = self.trainer.precision_plugin
        skipped = bool(getattr(plugin, "last_step_skipped", False))
        scheduler = self.lr_schedulers()
        if scheduler is not None and not skipped:
            scheduler.step()  # type: ignore[union-attr]
        self.log("train_loss", loss.detach().float(), prog_bar=True)
        if logging_step(self.trainer):  # a Python float: logging it on CUDA costs a host sync
            self.log("lr", opt.param_groups[0]["lr"])  # type: ignore[union-attr]
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch).float(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(
            self.model, lr=self.optim.lr, weight_decay=self.optim.weight_decay, fused=self.optim.fused
        )
        scheduler = build_scheduler(
            optimizer,
            name=self.optim.scheduler,
            warmup_steps=self.optim.warmup_steps,
            total_steps=self.total_steps or int(self.trainer.estimated_stepping_batches),
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
