"""Lightning callbacks and checkpoint I/O behind Keel's Trainer: state, step checkpoints, safe schedulers."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "KeelState",
    "LogLossScale",
    "SkipAwareSchedulers",
    "StepCheckpoint",
    "logging_step",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temp file and renames it into place: a kill mid-write leaves the old one intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".ckpt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))  # type: ignore[arg-type]
    numpy_state = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy_state["kind"], keys, numpy_state["pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class KeelState(Callback):
    """Puts the resolved run config and the RNG states into every checkpoint; restores RNG on resume."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.restored_config: dict[str, Any] | None = None
        self.last_val_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored_config = state_dict.get("config") or {}
        changed = {
            k: (v, self.config.get(k))
            for k, v in self.restored_config.items()
            if k not in ("resume", "progress") and self.config.get(k) != v
        }
        if changed:
            log.warning("resuming with settings that differ from the checkpoint's (old, new): %s", changed)
        set_rng_state(state_dict["rng"])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_val_step = trainer.global_step

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["keel_config"] = self.config  # also top-level, so tools find it without knowing callbacks


class StepCheckpoint(Checkpoint):
    """Saves ``<dir>/last.ckpt`` every ``every_n_steps`` optimizer steps and after the run's final batch.

    The final save happens inside the batch loop, not after ``fit`` returns: after a ``max_steps``
    stop Lightning marks the epoch finished, which would lose the position within the epoch.
    """

    def __init__(self, dirpath: Path, every_n_steps: int | None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.saved_step: int | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.last_path)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        periodic = bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0  # type: ignore[operator]
        if periodic or self._final_batch(trainer):
            self.save(trainer)

    @staticmethod
    def _final_batch(trainer: pl.Trainer) -> bool:
        if 0 < trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1
        return last_epoch and bool(trainer.is_last_batch)


class SkipAwareSchedulers(Callback):
    """For a user LightningModule (automatic optimization): a per-step scheduler does not advance on a skipped step.

    Lightning steps "interval=step" schedulers even when the loss scaler skipped the optimizer step
    (Lightning-AI/pytorch-lightning#18828); this wraps the module's ``lr_scheduler_step`` hook for
    the duration of the fit.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            return
        per_step = {id(cfg.scheduler) for cfg in trainer.lr_scheduler_configs if cfg.interval == "step"}
        original = pl_module.lr_scheduler_step
        plugin = trainer.precision_plugin

        def lr_scheduler_step(scheduler: Any, metric: Any | None) -> None:
            # Reads the scaler's flag back to the host (one sync per step): Lightning's scheduler API is host-side.
            if id(scheduler) in per_step and getattr(plugin, "last_step_skipped", False):
                return
            original(scheduler, metric)

        pl_module.lr_scheduler_step = lr_scheduler_step  # type: ignore[method-assign]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("lr_scheduler_step", None)  # back to the class's own hook


def logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes logs after this training batch (every ``log_every_n_steps``, and when stopping).

    Python numbers are best logged only then: on CUDA, ``self.log`` copies each one to the device, and a
    blocking host-to-device copy synchronises the stream, so per-step logging costs a sync per value.
    """
    every = int(getattr(trainer, "log_every_n_steps", 1))  # set by Lightning's logger connector at init
    return every > 0 and (trainer.global_step % every == 0 or trainer.should_stop)


class LogLossScale(Callback):
    """Logs the loss scale and the number of skipped steps on every logging step (see :func:`logging_step`)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        plugin = trainer.precision_plugin
        # The scaler's own scale tensor: logging it costs no host-device sync (GradScaler.get_scale() does, every step).
        scale = getattr(getattr(plugin, "keel_scaler", None), "_scale", None)
        if scale is not None and logging_step(trainer):
            pl_module.log("loss_scale", scale.detach().reshape(()))
            skipped = getattr(plugin, "skipped_steps_tensor", None)  # a device tensor: no sync
            pl_module.log("skipped_steps", skipped.float() if skipped is not None else 0.0)
