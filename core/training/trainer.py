"""Keel's Trainer: PyTorch Lightning underneath, the decisions an expert makes by hand on top.

Example::

    from core.training import Trainer
    trainer = Trainer(net, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), precision="auto",
                      checkpoint_dir="runs/fraud", checkpoint_every_n_steps=200, register_as="fraud")
    result = trainer.train(train_ds, val=val_ds, epochs=3, batch_size=256)
    result.model_version.ref   # "fraud@4"
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from core.config import keel_home
from core.distributed import (
    CommBytesLogger,
    CommHook,
    build_strategy,
    check_distributed,
    checkpoint_blocks,
    resolve_checkpoint_classes,
)
from core.distributed.activation_checkpointing import ActivationCheckpointing
from core.registry import ModelRegistry, ModelVersion
from core.training.callbacks import AtomicCheckpointIO, KeelState, LogLossScale, SkipAwareSchedulers, StepCheckpoint
from core.training.data import as_loader, dataset_fingerprint
from core.training.module import LossFn, LossFnModule, OptimConfig
from core.training.precision import Precision, cpu_bf16_candidate, detect_device, resolve_precision
from core.training.scaling import LossScaling, build_precision_plugin, check_loss_scaling
from core.training.speed import SpeedConfig, backend_flags, is_conv_net, prepare_model, resolve_speed

__all__ = ["Trainer", "TrainConfig", "TrainResult"]

log = logging.getLogger(__name__)

# Lightning's start-up chatter (device tables, tips, seed lines) goes through these loggers.
_NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning.pytorch")
# Logged every step but properties of the run, not of the model: kept out of TrainResult.metrics.
_RUN_STATS = frozenset({"lr", "loss_scale", "skipped_steps", "loss"})  # "loss": the progress bar's epoch mean


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; saved (resolved) inside each checkpoint and registry entry."""

    precision: str = "auto"
    loss_scaling: LossScaling = "dynamic"
    max_epochs: int = 1
    max_steps: int = -1
    lr: float = 1e-3
    weight_decay: float = 0.01
    scheduler: str = "cosine"
    warmup_steps: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_n_steps: int | None = None
    resume: bool = False
    seed: int = 0
    register_as: str | None = None
    log_every_n_steps: int = 50
    accelerator: str = "auto"
    devices: int = 1
    progress: bool = True
    batch_size: int = 32
    # Distributed (SPEC 2.2); activation_checkpointing holds the checkpointed class names.
    num_nodes: int = 1
    strategy: str = "auto"
    compression: str = "none"
    activation_checkpointing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_loss_scaling(self.loss_scaling)
        check_distributed(
            strategy=self.strategy, compression=self.compression, devices=self.devices, num_nodes=self.num_nodes
        )
        if self.scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {self.scheduler!r}")
        if self.max_epochs < 1 and self.max_steps < 1:
            raise ValueError("set max_epochs >= 1 or max_steps >= 1")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be >= 1 or None, got {self.checkpoint_every_n_steps}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder holding last.ckpt)")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {self.lr}, {self.weight_decay}, "
                f"{self.warmup_steps}"
            )


@dataclass
class TrainResult:
    """What a run produced."""

    model: nn.Module
    metrics: dict[str, float]
    precision: Precision
    skipped_steps: int
    loss_scale: float | None
    global_step: int
    epoch: int
    checkpoint_path: Path | None = None
    model_version: ModelVersion | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


class Trainer:
    """Train a model with the defaults an expert would pick (SPEC 2.1).

    ``model`` contract:
        * a ``LightningModule``: used as is; its ``training_step`` and ``configure_optimizers`` win
          (``lr``, ``weight_decay``, ``scheduler`` and ``warmup_steps`` are then unused).
        * a plain ``nn.Module`` plus ``loss_fn(model, batch) -> scalar tensor``: Keel wraps it with
          AdamW (fused on CUDA; no decay on biases/norms) and the chosen schedule (``"cosine"`` with
          linear warm-up over ``warmup_steps``, or ``"none"``), stepped once per optimizer step.
          With ``val`` data, ``loss_fn`` on a validation batch is logged as ``val_loss``.

    Args:
        model: see above.
        loss_fn: the loss for a plain ``nn.Module``.
        precision: ``"auto"`` or an explicit precision (see :func:`resolve_precision`); logged with its reason.
        loss_scaling: ``"dynamic"``, a float (static scale) or None; inf/NaN steps are skipped and
            the LR schedule does not advance on them.
        checkpoint_dir: where ``last.ckpt`` goes (every ``checkpoint_every_n_steps`` and at the end).
        resume: continue from ``checkpoint_dir/last.ckpt`` exactly (weights, optimizer, scheduler,
            scaler, RNG, epoch/step and the position within the epoch).
        registry / register_as: at the end, register the trained ``state_dict`` (with the resolved
            config, hyper-parameters, final metrics and data fingerprint) as a new version;
            ``registry`` defaults to ``ModelRegistry()`` under ``keel_home()``.
        scheduler: ``"cosine"`` (its horizon is ``min(max_steps, max_epochs * batches)``) or ``"none"``.
        callbacks: extra Lightning callbacks.
        speed: the speed defaults (TF32, cuDNN autotuning, channels-last, fused AdamW, ``torch.compile``);
            each is decided from the device and the model and logged with its reason. ``SpeedConfig(compile=False)``
            turns one off, ``SpeedConfig.off()`` all (``core.training.speed``).
        num_nodes / strategy: ``"auto"`` (DDP when ``devices * num_nodes > 1``), ``"ddp"`` or ``"fsdp"``;
            launch with ``torchrun`` on every node for several machines (``docs/distributed.md``).
        compression: DDP gradient compression, ``"none" | "fp16" | "bf16" | "int8" | "powersgd"``
            (``core.distributed.hooks``); bytes on the wire are logged.
        activation_checkpointing: True (the model's repeated blocks) or the block classes to recompute
            in backward instead of storing their activations.
        The rest map one to one onto Lightning's Trainer. With several processes, ``batch_size`` is per
        process and a Dataset is split between them by rank; resuming is exact mid-epoch there too
        (a DataLoader with a custom sampler resumes only as exactly as that sampler does).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: LossFn | None = None,
        precision: str = "auto",
        loss_scaling: LossScaling = "dynamic",
        max_epochs: int = 1,
        max_steps: int = -1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every_n_steps: int | None = None,
        resume: bool = False,
        seed: int = 0,
        registry: ModelRegistry | None = None,
        register_as: str | None = None,
        log_every_n_steps: int = 50,
        accelerator: str = "auto",
        devices: int = 1,
        progress: bool = True,
        callbacks: Sequence[pl.Callback] = (),
        num_nodes: int = 1,
        strategy: str = "auto",
        compression: str = "none",
        activation_checkpointing: ActivationCheckpointing = False,
        speed: SpeedConfig | None = None,
    ) -> None:
        if isinstance(model, pl.LightningModule):
            if loss_fn is not None:
                raise ValueError("loss_fn is for plain nn.Modules; a LightningModule defines its own training_step")
        elif isinstance(model, nn.Module):
            if loss_fn is None:
                raise TypeError("a plain nn.Module needs loss_fn=lambda model, batch: <scalar loss tensor>")
        else:
            raise TypeError(f"model must be an nn.Module or LightningModule, got {type(model).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.registry = registry
        self.callbacks = list(callbacks)
        self.checkpoint_classes = resolve_checkpoint_classes(model, activation_checkpointing)
        self.config = TrainConfig(
            precision=precision,
            loss_scaling=loss_scaling,
            max_epochs=max_epochs,
            max_steps=max_steps,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            warmup_steps=warmup_steps,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            resume=resume,
            seed=seed,
            register_as=register_as,
            log_every_n_steps=log_every_n_steps,
            accelerator=accelerator,
            devices=devices,
            progress=progress,
            num_nodes=num_nodes,
            strategy=strategy,
            compression=compression,
            activation_checkpointing=tuple(c.__name__ for c in self.checkpoint_classes),
        )
        self.comm: CommHook | None = None  # the gradient-compression hook of the last DDP run
        device = detect_device(accelerator, measure_cpu_bf16=cpu_bf16_candidate(precision, model))
        self.precision = resolve_precision(precision, device)
        self.speed = resolve_speed(SpeedConfig() if speed is None else speed, device, conv_net=is_conv_net(model))
        self.module = self._lightning_module()

    def _lightning_module(self) -> pl.LightningModule:
        if isinstance(self.model, pl.LightningModule):
            return self.model
        assert self.loss_fn is not None
        cfg = self.config
        optim = OptimConfig(
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scheduler=cfg.scheduler,
            warmup_steps=cfg.warmup_steps,
            fused=self.speed.enabled("fused_adamw"),
        )
        channels_last = self.speed.enabled("channels_last")
        return LossFnModule(self.model, self.loss_fn, optim=optim, channels_last_inputs=channels_last)

    def train(self, train: Any, val: Any = None, *, epochs: int | None = None, batch_size: int = 32) -> TrainResult:
        """Fit on ``train`` (a Dataset, DataLoader or LightningDataModule); validate on ``val`` each epoch.

        Args:
            train: training data; a Dataset is batched with ``batch_size`` and shuffled per epoch.
            val: optional validation Dataset/DataLoader (ignored for a LightningDataModule, which has its own).
            epochs: overrides ``max_epochs``.
            batch_size: batch size when ``train``/``val`` are Datasets.
        """
        cfg = dataclasses.replace(self.config, max_epochs=epochs or self.config.max_epochs, batch_size=batch_size)
        log.info("precision: %s (%s)", self.precision.name, self.precision.reason)
        self.speed.log()
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        resolved = {
            **dataclasses.asdict(cfg),
            "precision_resolved": self.precision.name,
            "precision_reason": self.precision.reason,
            "speed": self.speed.as_dict(),
        }
        fit_kwargs = self._fit_inputs(train, val, cfg)
        if isinstance(self.module, LossFnModule):
            self.module.total_steps = _total_steps(fit_kwargs.get("train_dataloaders"), cfg)
        ckpt_path = self._resume_path(cfg)
        state = KeelState(resolved)
        with _quiet_lightning(), backend_flags(self.speed):
            trainer, ckpt = self._lightning_trainer(cfg, state)
            # In place, after any activation-checkpoint wrapping: state_dict keys stay the eager model's.
            prepare_model(self.model if isinstance(self.module, LossFnModule) else self.module, self.speed)
            # Keel writes checkpoints in weights_only-safe types, so resuming never runs a full unpickler.
            trainer.fit(self.module, ckpt_path=ckpt_path, weights_only=True, **fit_kwargs)
            if ckpt is not None and ckpt.saved_step != trainer.global_step:
                ckpt.save(trainer)  # stopped early by something else (e.g. an early-stopping callback)
            metrics = _scalars(trainer.callback_metrics)
            val_loader = fit_kwargs.get("val_dataloaders")
            if val_loader is not None and state.last_val_step != trainer.global_step:
                # The run stopped mid-epoch: score the final weights, they are what gets registered.
                trainer.validate(self.module, dataloaders=val_loader, verbose=False)
                metrics.update(_scalars(trainer.callback_metrics))
        return self._result(trainer, cfg, resolved, metrics, train, ckpt)

    def _fit_inputs(self, train: Any, val: Any, cfg: TrainConfig) -> dict[str, Any]:
        if isinstance(train, pl.LightningDataModule):
            return {"datamodule": train}
        # On several processes each loader serves its rank's share (a DistributedSampler that Lightning keeps),
        # so a resume continues mid-epoch exactly there too.
        bs, seed, replicas = cfg.batch_size, cfg.seed, cfg.devices * cfg.num_nodes
        out = {"train_dataloaders": as_loader(train, batch_size=bs, shuffle=True, seed=seed, num_replicas=replicas)}
        if val is not None:
            out["val_dataloaders"] = as_loader(val, batch_size=bs, shuffle=False, seed=seed, num_replicas=replicas)
        return out

    def _lightning_trainer(self, cfg: TrainConfig, state: KeelState) -> tuple[pl.Trainer, StepCheckpoint | None]:
        root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else keel_home() / "runs"
        device_type = detect_device(cfg.accelerator).type
        plugin = build_precision_plugin(
            self.precision.name, device_type=device_type, loss_scaling=cfg.loss_scaling, fsdp=cfg.strategy == "fsdp"
        )
        ckpt = StepCheckpoint(root, cfg.checkpoint_every_n_steps) if cfg.checkpoint_dir else None
        callbacks: list[pl.Callback] = [state, SkipAwareSchedulers(), LogLossScale(), *self.callbacks]
        if ckpt is not None:
            callbacks.append(ckpt)
        strategy, self.comm = build_strategy(
            strategy=cfg.strategy,
            compression=cfg.compression,
            world_size=cfg.devices * cfg.num_nodes,
            model=self.model,
            checkpoint_classes=self.checkpoint_classes,
        )
        if self.checkpoint_classes:
            checkpoint_blocks(self.model, self.checkpoint_classes)
        if self.comm is not None:
            callbacks.append(CommBytesLogger(self.comm, every_n_steps=cfg.log_every_n_steps))
        trainer = pl.Trainer(
            accelerator=device_type,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=strategy,
            max_epochs=cfg.max_epochs,
            max_steps=cfg.max_steps,
            plugins=[plugin, AtomicCheckpointIO()],
            callbacks=callbacks,
            enable_checkpointing=ckpt is not None,
            default_root_dir=root,
            logger=CSVLogger(root, name="logs"),
            log_every_n_steps=cfg.log_every_n_steps,
            enable_progress_bar=cfg.progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        return trainer, ckpt

    @staticmethod
    def _resume_path(cfg: TrainConfig) -> str | None:
        if not cfg.resume:
            return None
        assert cfg.checkpoint_dir is not None
        path = Path(cfg.checkpoint_dir) / "last.ckpt"
        if not path.is_file():
            log.warning("resume=True but %s does not exist: starting from scratch", path)
            return None
        log.info("resuming from %s", path)
        return str(path)

    def _result(
        self,
        trainer: pl.Trainer,
        cfg: TrainConfig,
        resolved: dict[str, Any],
        metrics: dict[str, float],
        train: Any,
        ckpt: StepCheckpoint | None,
    ) -> TrainResult:
        plugin = trainer.precision_plugin
        skipped = int(getattr(plugin, "skipped_steps", 0))
        scale = getattr(plugin, "loss_scale", None)
        log.info("done: step %d, skipped steps %d, loss scale %s", trainer.global_step, skipped, scale)
        result = TrainResult(
            model=self.model,
            metrics=metrics,
            precision=self.precision,
            skipped_steps=skipped,
            loss_scale=scale,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            checkpoint_path=ckpt.last_path if ckpt else None,
            config=resolved,
        )
        if cfg.register_as:
            result.model_version = self._register(cfg.register_as, resolved, metrics, train)
        return result

    def _register(self, name: str, resolved: dict[str, Any], metrics: dict[str, float], train: Any) -> ModelVersion:
        registry = self.registry or ModelRegistry()
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        hparams = dict(getattr(self.model, "hparams", {}) or {})
        mv = registry.register(
            name,
            state,
            architecture=type(self.model).__name__,
            config=_jsonable(resolved),
            hparams=_jsonable(hparams),
            metrics=metrics,
            data_fingerprint=dataset_fingerprint(train),
        )
        log.info("registered %s", mv.ref)
        return mv


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k not in _RUN_STATS and torch.as_tensor(v).numel() == 1}


def _total_steps(loader: Any, cfg: TrainConfig) -> int | None:
    """Optimizer steps the run will take (None when the loader has no length)."""
    try:
        per_epoch = len(loader)
    except TypeError:
        return cfg.max_steps if cfg.max_steps > 0 else None
    by_epochs = per_epoch * cfg.max_epochs if cfg.max_epochs > 0 else None
    candidates = [n for n in (by_epochs, cfg.max_steps if cfg.max_steps > 0 else None) if n is not None]
    return min(candidates) if candidates else None


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy for the registry: anything JSON cannot hold is kept as its repr."""
    return json.loads(json.dumps(dict(d), default=repr))


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's tips and the num_workers advice for the duration of a fit."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")
        # Keel's wrapper always defines validation_step; no val data simply means no validation.
        warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")
        # Lightning 2.6's pytree helper vs torch 2.14: a deprecation aimed at Lightning, not at the user.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
