"""From Keel's ``strategy`` / ``compression`` / ``activation_checkpointing`` settings to a Lightning strategy.

Many machines: start one process per device with ``torchrun`` on every node and build the Trainer
with the same ``devices`` (processes per node) and ``num_nodes``; Lightning reads rank and world size
from torchrun's environment. See ``docs/distributed.md`` for the commands.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from torch import nn
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from core.distributed.activation_checkpointing import block_classes
from core.distributed.hooks import COMPRESSIONS, CommHook, build_comm_hook
from core.distributed.wire import CommState

__all__ = ["STRATEGIES", "check_distributed", "build_strategy", "CommBytesLogger"]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")


def check_distributed(*, strategy: str, compression: str, devices: int, num_nodes: int) -> None:
    """Fail fast on settings that cannot work together."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    COMPRESSIONS.get(compression)  # unknown names raise, listing the known ones
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"need devices >= 1 and num_nodes >= 1, got devices={devices}, num_nodes={num_nodes}")
    if strategy == "fsdp" and compression != "none":
        raise ValueError(
            f"compression={compression!r} is a DDP communication hook; FSDP reduce-scatters its own shards. "
            "Use strategy='ddp' with compression, or compression='none' with FSDP."
        )


class KeelDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy, registering the communication hook on every device type.

    Lightning registers DDP comm hooks only on CUDA (a note from torch 1.8, when only NCCL supported
    them); gloo runs them too, and without this a CPU run would silently train uncompressed.
    """

    def _register_ddp_hooks(self) -> None:
        if self.root_device.type == "cuda":
            return super()._register_ddp_hooks()
        assert isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        if self._ddp_comm_hook is not None:
            self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)


class KeelFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, also on CPU processes (gloo).

    Lightning refuses ``FSDPStrategy`` unless the accelerator is CUDA (an exact-type check); torch's
    FSDP itself shards, gathers and reduce-scatters over gloo on CPU, which is how the tests run it,
    once it is told the device explicitly (Lightning passes ``device_id=None`` for CPU).
    """

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Backward, then FSDP's end-of-backward step if the backward ran inside the root's forward.

        Keel's wrapper optimises manually, so ``training_step`` (forward, backward and the optimizer
        step) runs inside the root FSDP module's forward, before FSDP could hook the root's outputs;
        its end-of-backward callback then never fires and the next state-dict gather (a checkpoint)
        finds the units still in their backward state.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._common_utils import TrainingState
        from torch.distributed.fsdp._flat_param import HandleTrainingState
        from torch.distributed.fsdp._runtime_utils import _post_backward_final_callback

        backward_states = (HandleTrainingState.BACKWARD_PRE, HandleTrainingState.BACKWARD_POST)

        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        root = self.model
        if isinstance(root, FullyShardedDataParallel) and any(
            st._handle is not None and st._handle._training_state in backward_states for st in root._all_fsdp_states
        ):
            root_handle_state = root._handle._training_state if root._handle is not None else None
            _post_backward_final_callback(root, root)
            # The root's forward is still running (it called training_step): leave it in that state.
            root.training_state = TrainingState.FORWARD_BACKWARD
            if root._handle is not None and root_handle_state is not None:
                root._handle._training_state = root_handle_state
        return out

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The full optimizer state, gathered without torch's CPU offload on CPU processes.

        torch's FSDP gathers each optimizer state (Adam's ``exp_avg``, then ``exp_avg_sq``) into one reused
        buffer and keeps views of it, relying on the offload's device-to-host copy to detach them. On CPU
        processes that copy is a no-op, so every state of a checkpoint held the last one gathered (``exp_avg``
        saved as ``exp_avg_sq``) and a resumed run diverged. Without offload, torch clones each state instead.
        """
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        assert self.model is not None
        context = FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )
        with context:
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard layout, as Lightning stores it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def build_strategy(
    *,
    strategy: str,
    compression: str,
    world_size: int,
    model: nn.Module | None = None,
    checkpoint_classes: tuple[type[nn.Module], ...] = (),
    bucket_cap_mb: float | None = None,
) -> tuple[str | Strategy, CommHook | None]:
    """The Lightning strategy and, for DDP, the communication hook registered on it.

    ``"auto"`` is DDP as soon as there is more than one process, else a single device. FSDP shards
    each of the model's repeated blocks (:func:`block_classes`) as its own unit, so only one block's
    full parameters are gathered at a time, and the model itself as a unit below Lightning's root
    (the root must hold no parameters: Keel's wrapper runs backward inside the root's forward).
    """
    if strategy == "fsdp":
        blocks = tuple(set(block_classes(model) if model is not None else ()) | set(checkpoint_classes))
        names = ", ".join(sorted(c.__name__ for c in blocks)) or "none"
        log.info("strategy: FSDP (full shard) over %d processes; units: the model and each of %s", world_size, names)
        policy = functools.partial(
            lambda_auto_wrap_policy, lambda_fn=lambda m: m is model or (bool(blocks) and isinstance(m, blocks))
        )
        return KeelFSDPStrategy(auto_wrap_policy=policy), None
    if strategy == "auto" and world_size == 1:
        if compression != "none":
            log.warning("compression=%r has nothing to do with a single process: not used", compression)
        return "auto", None
    hook = build_comm_hook(compression)
    ddp_kwargs: dict[str, Any] = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    log.info("strategy: DDP over %d processes, gradient compression %r", world_size, compression)
    return KeelDDPStrategy(ddp_comm_state=hook.state, ddp_comm_hook=hook.hook, **ddp_kwargs), hook


class CommBytesLogger(pl.Callback):
    """Logs the bytes this rank put on the wire: per step to the run's logger, the totals at the end."""

    def __init__(self, hook: CommHook, *, every_n_steps: int) -> None:
        self.hook, self.every = hook, max(1, every_n_steps)
        self._last_bytes, self._last_step = 0, 0

    @property
    def state(self) -> CommState:
        return self.hook.state

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step - self._last_step < self.every or trainer.logger is None:
            return
        per_step = (self.state.bytes_sent - self._last_bytes) / (step - self._last_step)
        trainer.logger.log_metrics({"comm_bytes_per_step": per_step, "comm_ratio_vs_fp32": self.state.ratio}, step)
        self._last_bytes, self._last_step = self.state.bytes_sent, step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = max(1, trainer.global_step)
        if trainer.world_size > 1 and trainer.global_step > 0 and self.state.buckets == 0:
            raise RuntimeError(f"the {self.hook.name!r} communication hook never ran: gradients were not compressed")
        log.info(
            "compression %s: %.3f MB/step sent by rank %d (fp32 all-reduce: %.3f MB/step, %.2fx fewer bytes)",
            self.hook.name,
            self.state.bytes_sent / steps / 1e6,
            trainer.global_rank,
            self.state.fp32_bytes / steps / 1e6,
            self.state.ratio,
        )
