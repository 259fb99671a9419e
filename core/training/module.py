"""The LightningModule Keel builds around a plain ``nn.Module`` and a ``loss_fn``.

Manual optimization, so that the LR scheduler advances only on optimizer steps that really
happened: a step the loss scaler skipped (inf/NaN gradients) leaves the schedule where it was
(the fix for Lightning-AI/pytorch-lightning#18828).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from core.training.callbacks import logging_step
from core.training.schedule import SkipAwareCosine
from core.training.speed import channels_last_batch

__all__ = [
    "LossFn",
    "OptimConfig",
    "LossFnModule",
    "build_optimizer",
    "build_scheduler",
    "no_decay_names",
    "original_name",
]

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


# Wrappers that insert a level into parameter names; FSDP's nested units keep theirs in named_parameters().
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def original_name(name: str) -> str:
    """A parameter's name without the levels FSDP, activation checkpointing and ``torch.compile`` insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_decay_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters that get no weight decay: biases and norm weights (fewer than 2 dimensions).

    Decided from the parameters' own shapes, so call it before a strategy reshapes them: FSDP turns every
    parameter into a flat 1-D shard, where this test would put everything in the no-decay group.
    """
    _refuse_flattened(model)
    return frozenset(original_name(name) for name, p in model.named_parameters() if p.ndim < 2)


def _refuse_flattened(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "the model is already wrapped by FSDP, whose parameters are flat 1-D shards: take "
            "no_decay_names(model) before wrapping and pass it to build_optimizer(no_decay=...)"
        )


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, fused: bool = False, no_decay: frozenset[str] | None = None
) -> torch.optim.AdamW:
    """AdamW; no decay on biases and norm weights; with ``fused``, the single-kernel AdamW.

    ``no_decay`` names the parameters without weight decay (:func:`no_decay_names`, taken before any
    FSDP wrapping; None: decided from ``model`` now). Parameters are matched by name, which FSDP keeps
    (``use_orig_params=True``, Lightning's default) while it flattens their shapes.

    ``fused`` applies where PyTorch has the kernel for every parameter's device (CUDA, CPU); the Trainer's
    speed plan asks for it on CUDA by default (``SpeedConfig.fused_adamw``). The fused optimizer gets its
    learning rate as a tensor on the parameters' device, so the schedule (:class:`SkipAwareCosine`) and the
    loss scaler's skip both stay on the device: no host sync per step.
    """
    named = [(original_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if no_decay is None:
        no_decay = no_decay_names(model)
    missing = sorted(no_decay - {original_name(n) for n, _ in model.named_parameters()})
    if missing:  # e.g. FSDP with use_orig_params=False: its flat parameters have names of their own
        raise ValueError(
            f"no_decay names parameters the model does not have: {', '.join(missing[:5])}; "
            f"it has {', '.join(n for n, _ in named[:5])}. Wrap FSDP with use_orig_params=True."
        )
    decay = [p for n, p in named if n not in no_decay]
    plain = [p for n, p in named if n in no_decay]
    params = [p for _, p in named]
    fused = fused and all(p.device.type in ("cuda", "cpu") for p in params)

    def rate() -> float | torch.Tensor:  # one tensor per group, on the parameters' device, for the fused kernel
        return torch.tensor(lr, device=params[0].device) if fused else lr

    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": rate()},
        {"params": plain, "weight_decay": 0.0, "lr": rate()},
    ]
    n_decay, n_plain = sum(p.numel() for p in decay), sum(p.numel() for p in plain)
    log.info(
        "optimizer: AdamW(lr=%g, weight_decay=%g on %d elements, 0 on %d), fused=%s",
        lr,
        weight_decay,
        n_decay,
        n_plain,
        fused,
    )
    return torch.optim.AdamW(groups, lr=rate(), fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int
) -> SkipAwareCosine | None:
    """Linear warm-up then cosine decay to 0 over ``total_steps`` (``"cosine"``), or None (``"none"``)."""
    if name == "none":
        return None
    if name != "cosine":
        raise ValueError(f"scheduler must be 'cosine' or 'none', got {name!r}")
    return SkipAwareCosine(optimizer, warmup_steps=warmup_steps, total_steps=max(1, total_steps))


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
        # Weight-decay groups by name, decided from the shapes now: FSDP later flattens every parameter.
        self.no_decay = no_decay_names(model)

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
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            # The scaler's inf flag stays a device tensor; the schedule does not advance on a skipped step.
            scheduler.step(getattr(self.trainer.precision_plugin, "found_inf", None))  # type: ignore[union-attr,call-arg]
        loss = loss.detach()
        # Per-step loss to the logger only: a progress-bar metric is turned into a Python number every step
        # (a host sync). The bar shows the epoch's mean loss, computed on the device and read once per epoch.
        self.log("train_loss", loss.float())
        self.log("loss", loss.float(), on_step=False, on_epoch=True, prog_bar=True, logger=False, sync_dist=True)
        if logging_step(self.trainer):
            lr = opt.param_groups[0]["lr"]  # type: ignore[union-attr]
            self.log("lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)  # the schedule updates it in place
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch).float(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(
            self.model,
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            fused=self.optim.fused,
            no_decay=self.no_decay,
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
