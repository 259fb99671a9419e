"""Loss scaling owned by Keel, inside Lightning's precision plugins.

Lightning's own fp16 plugin steps the LR scheduler even when the GradScaler skipped the optimizer
step (Lightning-AI/pytorch-lightning#18828) and only scales on CUDA. Keel's plugins keep
Lightning's autocast / dtype handling but run one ``torch.amp.GradScaler`` themselves, on any
device, and record whether the last optimizer step was skipped, so the scheduler can stay put.

``loss_scaling``: ``"dynamic"`` (grow x2 every 2000 clean steps, halve and skip on inf/NaN), a
float (static scale; inf/NaN steps are still skipped), or ``None`` (no scaler, no skipping). With
fp32/bf16 the scaler's job is the inf/NaN guard: scaling by a power of two is exact there.

Under FSDP the same mixin sits in front of Lightning's ``FSDPPrecision`` with torch's
``ShardedGradScaler``: each rank checks only its own gradient shard, and the scaler all-reduces the
inf flag, so every rank skips the same steps and the schedule stays put on all of them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, HalfPrecision, MixedPrecision
from lightning.pytorch.plugins.precision import Precision as PLPrecision
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.optim import Optimizer

__all__ = ["KeelFSDPPrecision", "LossScaling", "build_precision_plugin", "check_loss_scaling"]

LossScaling = str | float | None


def check_loss_scaling(loss_scaling: LossScaling) -> LossScaling:
    """Validate a ``loss_scaling`` value; return it unchanged."""
    if loss_scaling is None or loss_scaling == "dynamic":
        return loss_scaling
    if isinstance(loss_scaling, int | float) and not isinstance(loss_scaling, bool) and loss_scaling > 0:
        return float(loss_scaling)
    raise ValueError(f"loss_scaling must be 'dynamic', a positive float (static scale) or None, got {loss_scaling!r}")


class _KeelLossScaling:
    """Mixin placed before a Lightning precision plugin in the MRO; adds the Keel-owned scaler.

    The scaler's inf/NaN verdict stays on the device: ``found_inf`` (a 0-d tensor, > 0 when the last
    step was skipped) feeds the fused optimizer's own skip and Keel's schedule without a host read, and
    the skipped-step count accumulates there. Host reads happen only when asked (``last_step_skipped``,
    ``skipped_steps``, ``loss_scale``): at logging steps, in checkpoints, at the end of the run.
    """

    # The scaler class: one process's GradScaler, or FSDP's ShardedGradScaler (all-reduces the inf flag).
    scaler_class: ClassVar[type[torch.amp.GradScaler]] = torch.amp.GradScaler
    keel_scaler: torch.amp.GradScaler | None
    static_scale: float | None
    found_inf: torch.Tensor | None
    _skipped: torch.Tensor | int

    def _init_scaling(self, loss_scaling: LossScaling, device_type: str) -> None:
        self.static_scale = loss_scaling if isinstance(loss_scaling, float) else None
        self.keel_scaler = None
        if loss_scaling is not None:
            init = self.static_scale if self.static_scale is not None else 2.0**16
            self.keel_scaler = self.scaler_class(device_type, init_scale=init)
        self.found_inf = None
        self._skipped = 0

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale (None without a scaler; a host read)."""
        return self.keel_scaler.get_scale() if self.keel_scaler is not None else None

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (a host read of ``found_inf``)."""
        return self.found_inf is not None and bool(self.found_inf > 0)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (a host read)."""
        return int(self._skipped)

    @property
    def skipped_steps_tensor(self) -> torch.Tensor | None:
        """The skipped-step count as a device tensor, for logging without a sync (None before the first step)."""
        return self._skipped if isinstance(self._skipped, torch.Tensor) else None

    def pre_backward(self, tensor: torch.Tensor, module: pl.LightningModule) -> torch.Tensor:
        if self.keel_scaler is not None:
            tensor = self.keel_scaler.scale(tensor)
        return super().pre_backward(tensor, module)  # type: ignore[misc]

    def optimizer_step(
        self, optimizer: Optimizer, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        scaler = self.keel_scaler
        if scaler is None:
            self.found_inf = None
            return super().optimizer_step(optimizer, model, closure, **kwargs)  # type: ignore[misc]
        closure_result = closure()  # automatic optimization: forward + backward happen here
        if model.automatic_optimization and closure_result is None:
            return None  # training_step returned None: nothing to step
        scaler.unscale_(optimizer)  # so clipping and on_before_optimizer_step see true gradients
        self._after_closure(model, optimizer)  # type: ignore[attr-defined]
        # GradScaler keeps the inf check per device and clears it in update(): keep the sum, on the device.
        flags = list(scaler._found_inf_per_device(optimizer).values())
        found_inf: torch.Tensor = (
            torch.stack([f.to(flags[0].device) for f in flags]).sum() if len(flags) > 1 else flags[0]
        )
        # A fused optimizer skips inside its kernel (GradScaler hands it found_inf); others make GradScaler read it.
        out = scaler.step(optimizer, **kwargs)
        scaler.update(new_scale=self.static_scale)
        self.found_inf = found_inf
        self._skipped = self._skipped + (found_inf > 0).to(torch.int64)
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.keel_scaler is None:
            return {}
        return {"scaler": self.keel_scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.keel_scaler is not None and state_dict:
            self.keel_scaler.load_state_dict(state_dict["scaler"])
            self._skipped = int(state_dict.get("skipped_steps", 0))


class KeelPrecision32(_KeelLossScaling, PLPrecision):  # type: ignore[misc]  # Lightning's own overrides differ the same way
    """fp32 training with Keel's loss scaler / inf guard."""

    def __init__(self, loss_scaling: LossScaling, device_type: str) -> None:
        super().__init__()
        self._init_scaling(loss_scaling, device_type)


class KeelMixedPrecision(_KeelLossScaling, MixedPrecision):  # type: ignore[misc]  # Lightning's own overrides differ the same way
    """Lightning's autocast (bf16-mixed / 16-mixed) with Keel's scaler instead of Lightning's."""

    def __init__(self, precision: str, device_type: str, loss_scaling: LossScaling) -> None:
        super().__init__(precision, device_type)  # type: ignore[arg-type]
        self.scaler = None  # Lightning's own scaler off: ours must be the only one scaling the loss
        self._init_scaling(loss_scaling, device_type)


class KeelHalfPrecision(_KeelLossScaling, HalfPrecision):  # type: ignore[misc]  # Lightning's own overrides differ the same way
    """bf16 weights and compute (``bf16-true``) with Keel's inf guard."""

    def __init__(self, precision: str, device_type: str, loss_scaling: LossScaling) -> None:
        super().__init__(precision)  # type: ignore[arg-type]
        self._init_scaling(loss_scaling, device_type)


class _ShardedGradScaler(ShardedGradScaler):
    """torch's ShardedGradScaler with GradScaler's 0-d inf flags.

    ShardedGradScaler keeps its per-device inf flags as shape-(1,) tensors (summed over ranks); GradScaler
    hands them to a fused optimizer, whose kernel subtracts the flag from its 0-d step counts in place and
    fails on the shape (torch 2.14). Reshaped to 0-d views after the all-reduce, they work everywhere.
    """

    def unscale_(self, optimizer: Optimizer) -> None:
        super().unscale_(optimizer)
        if self._enabled:
            flags = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
            for device, flag in flags.items():
                flags[device] = flag.reshape(())


class KeelFSDPPrecision(_KeelLossScaling, FSDPPrecision):  # type: ignore[misc]  # Lightning's own overrides differ the same way
    """Lightning's FSDP precision (FSDP's parameter / reduce dtypes) with Keel's sharded scaler; autocast on any device.

    FSDP casts the parameters to the compute dtype itself (``mixed_precision_config``, Lightning's) and
    reduce-scatters the gradients in it; each rank then holds, and checks for inf/NaN, only its shard.
    """

    scaler_class = _ShardedGradScaler

    def __init__(self, precision: str, device_type: str, loss_scaling: LossScaling) -> None:
        with warnings.catch_warnings():
            # For 16-mixed Lightning builds a CUDA ShardedGradScaler, which warns on a machine without CUDA;
            # it is dropped on the next line: Keel's scaler (on the training device) must be the only one.
            warnings.filterwarnings("ignore", message=r".*CUDA is not available.*", category=UserWarning)
            super().__init__(precision)  # type: ignore[arg-type]
        self.scaler = None
        self.device_type = device_type
        self._init_scaling(loss_scaling, device_type)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast on the training device (Lightning's FSDPPrecision always asks for CUDA autocast)."""
        if "mixed" in self.precision:
            dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
            return torch.autocast(self.device_type, dtype=dtype)
        return super().forward_context()


def build_precision_plugin(
    precision: str, *, device_type: str, loss_scaling: LossScaling, fsdp: bool = False
) -> PLPrecision:
    """The Lightning precision plugin for a resolved precision name and a ``loss_scaling`` choice.

    ``fsdp``: the plugin for Lightning's FSDP strategy, which takes only ``FSDPPrecision`` subclasses.
    """
    loss_scaling = check_loss_scaling(loss_scaling)
    if precision not in ("32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ValueError(f"no precision plugin for {precision!r}; expected 32-true, bf16-mixed, 16-mixed or bf16-true")
    if fsdp:
        return KeelFSDPPrecision(precision, device_type, loss_scaling)
    if precision == "32-true":
        return KeelPrecision32(loss_scaling, device_type)
    if precision == "bf16-true":
        return KeelHalfPrecision(precision, device_type, loss_scaling)
    return KeelMixedPrecision(precision, device_type, loss_scaling)
