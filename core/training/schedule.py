"""Keel's LR schedule: linear warm-up then cosine decay to 0, counted in optimizer steps that really happened.

A step the loss scaler skipped (inf/NaN gradients) must not advance the schedule. Whether a step was
skipped is known only on the device (``GradScaler``'s ``found_inf``), so a host-side scheduler has to
read it back every step: a host-device sync that leaves a GPU idle while Python catches up. When the
optimizer keeps its learning rates as tensors on the device (fused AdamW, see
:func:`core.training.module.build_optimizer`), :class:`SkipAwareCosine` keeps its step count there too
and writes the new rates with tensor arithmetic: ``count += 1 - found_inf``, no sync. With Python-float
learning rates it runs on the host and reads ``found_inf`` (one sync per step; none without a scaler).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["SkipAwareCosine"]


class SkipAwareCosine(LRScheduler):
    """Warm-up over ``warmup_steps`` then cosine to 0 at ``total_steps``; ``step(found_inf)`` skips on inf.

    An ``LRScheduler`` (so any LightningModule can return it from ``configure_optimizers``) that implements
    the whole protocol itself (``step``, ``state_dict``, ``load_state_dict``, ``optimizer``, ``get_last_lr``)
    and does not run the base ``__init__``, which would read and write the rates as host floats.
    ``last_epoch`` is the number of optimizer steps applied so far (reading it on the device path syncs, so
    the training step never does).
    """

    def __init__(  # noqa: D107 - documented on the class
        self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
    ) -> None:  # pylint: disable=super-init-not-called
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        lrs = [g["lr"] for g in optimizer.param_groups]
        self.base_lrs = [float(lr) for lr in lrs]  # at construction: the one host read of a tensor lr
        self.on_device = all(isinstance(lr, torch.Tensor) for lr in lrs)
        device = lrs[0].device if self.on_device else torch.device("cpu")
        self._count: torch.Tensor | int = torch.zeros((), dtype=torch.float64, device=device) if self.on_device else 0
        self._write()

    def factor(self, step: float) -> float:
        """The multiplier of the base rate after ``step`` applied optimizer steps (host arithmetic)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _factor_tensor(self, step: torch.Tensor) -> torch.Tensor:
        """:meth:`factor` in tensor arithmetic on the step's device (no host read)."""
        warm = (step + 1) / max(1, self.warmup_steps)
        progress = ((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)).clamp(0.0, 1.0)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * progress))
        return torch.where(step < self.warmup_steps, warm, cosine)

    def step(self, found_inf: torch.Tensor | None = None) -> None:  # type: ignore[override]  # takes the scaler's flag, not an epoch
        """Advance by one optimizer step unless ``found_inf`` (the scaler's flag, > 0 on a skipped step) is set."""
        if isinstance(self._count, torch.Tensor):
            if found_inf is None:
                self._count += 1
            else:  # 1 on a clean step, 0 on a skipped one, computed where the flag lives
                self._count += (found_inf.to(self._count.device, torch.float64) <= 0).to(torch.float64)
        elif found_inf is None or not bool(found_inf > 0):  # host path: reading the flag is the one sync
            self._count += 1
        self._write()

    def _write(self) -> None:
        groups = self.optimizer.param_groups
        if isinstance(self._count, torch.Tensor):
            factor = self._factor_tensor(self._count)
            for group, base in zip(groups, self.base_lrs, strict=True):
                lr = group["lr"]
                if isinstance(lr, torch.Tensor) and lr.device == factor.device:
                    lr.copy_(factor * base)  # in place: the fused kernel reads this tensor
                else:  # e.g. an optimizer state loaded onto another device
                    group["lr"] = (factor * base).to(torch.float32)
        else:
            f = self.factor(self._count)
            for group, base in zip(groups, self.base_lrs, strict=True):
                group["lr"] = base * f

    @property
    def last_epoch(self) -> int:  # type: ignore[override]  # derived from the count, not stored
        """Optimizer steps applied so far (a host read on the device path)."""
        return int(self._count)

    def get_last_lr(self) -> list[float | torch.Tensor]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"count": int(self._count), "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count (also from a ``LambdaLR`` state of earlier Keel checkpoints: ``last_epoch``)."""
        count = int(state["count"] if "count" in state else state["last_epoch"])
        if isinstance(self._count, torch.Tensor):
            self._count.fill_(count)
        else:
            self._count = count
        self._write()
