"""Train the PCB defect detector on DeepPCB pairs and register it (``pcb_inspection``, alias ``production``).

Training runs through Keel's :class:`core.training.Trainer` (AdamW, precision ``auto``: bf16-mixed on a recent
GPU, fp32 on CPU) under a wall-clock budget: the learning rate follows warm-up + cosine over the fraction of the
budget (or of ``max_steps``) already used, and training stops cleanly when it is spent, so a run of any length ends
with a fully decayed schedule. Then the held-out part (20% of the pairs, split by board group) is scored and the
model is registered with those metrics.

Run::

    python -m apps.pcb_inspection.train --recipe cpu [--budget-s 600] [--split group|random]
    python -m apps.pcb_inspection.train --import-weights OUT/pcb_gpu_model.pt   # register the GPU recipe's weights
    python -m apps.pcb_inspection.train --init OUT/pcb_gpu_model.pt --budget-s 600 --lr 1e-3  # fine-tune a model
    keel train pcb_inspection --recipe cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader

from apps.pcb_inspection.data import PairRecord, PcbDataset, board_group_split, collate, random_split, read_list
from apps.pcb_inspection.evaluate import detect_records, pcb_metrics
from apps.pcb_inspection.model import (
    PcbDetector,
    PcbDetectorConfig,
    PcbPredictor,
    create_model,
    detection_loss,
    to_input,
)
from core.utils.registry import Registry

__all__ = [
    "RECIPES",
    "PcbTrainConfig",
    "TimeBudget",
    "fit",
    "import_weights",
    "main",
    "split_records",
    "train_on_pairs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PcbTrainConfig:
    """Every setting of a training run (saved in the registry entry)."""

    model: str = "pcb_det_tiny"
    init: str | None = None  # registry ref or pcb_gpu_model.pt to go on training (its architecture, not `model`)
    data_dir: str | None = None  # folder the list's paths are relative to; None: the list's folder
    list_file: str | None = None  # None: <KEEL_DATA_DIR>/pcb/DeepPCB/PCBData/trainval.txt
    split: str = "group"  # "group" (20% by board group), "random" (20% of pairs) or "none" (train on all)
    holdout: float = 0.2
    crop: int = 256  # side of the random training crops (the detector is fully convolutional)
    max_shift: int = 8  # template misregistration in training, px along each axis
    template_dropout: float = 0.1  # 1.0: never a template: a test-image-only detector, which then ignores templates
    same_pair: float = 0.0  # share of items whose template is their own test image, boxes dropped (data.PcbDataset)
    # Second stage: the last stage2_frac of the budget restarts warm-up + cosine at stage2_lr (None: lr / 2) with
    # stage2_same_pair same pairs, which teach a detector trained on looks to compare with the template.
    stage2_frac: float = 0.0
    stage2_lr: float | None = None
    stage2_same_pair: float = 0.25
    giou_weight: float = 0.0  # GIoU box loss on top of CenterNet's L1 (see model.detection_loss)
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.03
    budget_s: float | None = 180.0  # wall-clock seconds of training; None: until max_steps
    max_steps: int = -1
    precision: str = "auto"
    accelerator: str = "auto"
    num_workers: int = 0
    repeat: int = 1  # passes over the pairs per loader epoch (fewer epoch boundaries: workers never drain)
    score_threshold: float = 0.3  # for the DeepPCB F-score and the service's answers
    seed: int = 0
    register_as: str | None = "pcb_inspection"
    registry_root: str | None = None  # None: the registry under KEEL_HOME
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("group", "random", "none"):
            raise ValueError(f"split must be 'group', 'random' or 'none', got {self.split!r}")
        if self.budget_s is None and self.max_steps < 1:
            raise ValueError("set budget_s (seconds) or max_steps >= 1, or training would never end")
        if self.crop % 32:
            raise ValueError(f"crop must be a multiple of 32, got {self.crop}")
        if self.stage2_frac > 0 and self.budget_s is None:
            raise ValueError("stage2_frac is a share of budget_s: set budget_s")
        for name in ("same_pair", "stage2_same_pair", "stage2_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.template_dropout <= 1.0:
            raise ValueError(f"template_dropout must be in [0, 1], got {self.template_dropout}")


RECIPES: Registry[PcbTrainConfig] = Registry("pcb_inspection recipe")
#: The CPU demo: the small model on every pair, 256 px crops, ~2 minutes on 2 cores (no held-out scoring).
RECIPES.add("demo", PcbTrainConfig(model="pcb_det_tiny", budget_s=120.0, split="none"))
#: CPU training as far as time allows (set --budget-s).
RECIPES.add("cpu", PcbTrainConfig(model="pcb_det_tiny", budget_s=600.0))
#: The full recipe for one GPU: resnet10t detector, 512 px crops, batch 32, bf16; 270 s, then 90 s with same pairs.
RECIPES.add(
    "gpu",
    PcbTrainConfig(
        model="pcb_det_r10",
        crop=512,
        batch_size=32,
        lr=3e-3,
        budget_s=360.0,
        stage2_frac=0.25,
        num_workers=12,
        repeat=8,
        progress=False,
    ),
)


class TimeBudget(pl.Callback):
    """Warm-up + cosine learning rate over the used fraction of a wall-clock budget and/or a step budget.

    Sets every param group's lr before each batch (the Trainer runs with ``scheduler="none"``) and asks Lightning
    to stop once the budget is spent; logs progress every ``log_every_s`` seconds.
    """

    def __init__(
        self, *, lr: float, budget_s: float | None, max_steps: int, warmup_frac: float, log_every_s: float = 30.0
    ) -> None:
        self.lr, self.budget_s, self.max_steps, self.warmup_frac = lr, budget_s, max_steps, warmup_frac
        self.log_every_s = log_every_s
        self.start = self.last_log = 0.0

    def progress(self, step: int) -> float:
        by_time = (time.monotonic() - self.start) / self.budget_s if self.budget_s else 0.0
        by_steps = step / self.max_steps if self.max_steps > 0 else 0.0
        return max(by_time, by_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last_log = time.monotonic()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        p = min(1.0, self.progress(trainer.global_step))
        w = self.warmup_frac
        factor = p / w if p < w else 0.5 * (1 + math.cos(math.pi * (p - w) / max(1e-9, 1 - w)))
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.lr * max(factor, 0.01 if p < w else 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s:
            self.last_log = now
            loss = trainer.callback_metrics.get("train_loss")
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            log.info("step %d, %.0f s, loss %s, lr %.2e", trainer.global_step, now - self.start, loss, lr)
        if self.progress(trainer.global_step) >= 1.0:
            trainer.should_stop = True


def split_records(
    records: list[PairRecord], *, split: str, holdout: float, seed: int
) -> tuple[list[PairRecord], list[PairRecord]]:
    """``(train, held_out)`` by board group, at random, or ``(all, [])``."""
    if split == "group":
        return board_group_split(records, holdout=holdout)
    if split == "random":
        return random_split(records, holdout=holdout, seed=seed)
    return records, []


def _loss(model: torch.nn.Module, batch: Any, *, giou_weight: float = 0.0) -> torch.Tensor:
    images, has_template, boxes, classes = batch
    x = to_input(images, has_template)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    loss, _ = detection_loss(model(x), boxes, classes, giou_weight=giou_weight)
    return loss


def fit(
    cfg: PcbTrainConfig, train_records: list[PairRecord], *, model: PcbDetector | None = None
) -> tuple[PcbDetector, dict[str, Any]]:
    """Trains a fresh ``cfg.model`` (or goes on training ``model``, e.g. a pruned detector) on ``train_records``;
    returns it (eval mode) and run statistics. With ``cfg.stage2_frac`` the budget's last part is a second run."""
    if cfg.stage2_frac > 0:
        assert cfg.budget_s is not None  # checked by the config
        first = dataclasses.replace(cfg, budget_s=cfg.budget_s * (1 - cfg.stage2_frac), stage2_frac=0.0)
        second = dataclasses.replace(
            cfg,
            budget_s=cfg.budget_s * cfg.stage2_frac,
            stage2_frac=0.0,
            lr=cfg.stage2_lr if cfg.stage2_lr is not None else cfg.lr / 2,
            same_pair=cfg.stage2_same_pair,
            seed=cfg.seed + 1,  # other augmentations than stage 1's first ones
        )
        model, one = fit(first, train_records, model=model)
        model, two = fit(second, train_records, model=model)
        stats = {k: one[k] + two[k] for k in ("steps", "epochs", "train_seconds")}
        stats.update(
            images_per_s=round(stats["steps"] * cfg.batch_size / max(stats["train_seconds"], 1e-9), 1),
            precision=two["precision"],
            train_loss=two["train_loss"],
            stages=[one, two],
        )
        return model, stats
    torch.manual_seed(cfg.seed)
    model = (create_model(cfg.model) if model is None else model).train()
    stats = train_on_pairs(model, cfg, train_records, loss_fn=functools.partial(_loss, giou_weight=cfg.giou_weight))
    return model.eval(), stats


def train_on_pairs(
    model: torch.nn.Module,
    cfg: PcbTrainConfig,
    train_records: list[PairRecord],
    *,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> dict[str, Any]:
    """Trains ``model`` in place on augmented ``train_records`` with ``loss_fn(model, batch)`` (batches from
    :func:`~apps.pcb_inspection.data.collate`) through Keel's Trainer, under ``cfg``'s budget; returns run stats.
    :func:`fit` runs Keel's detector through it, ``benchmarks/pcb_baseline.py`` a torchvision Faster R-CNN."""
    from core.training import Trainer
    from core.training.precision import PRECISIONS
    from core.training.speed import SpeedConfig

    data = PcbDataset(
        train_records,
        train=True,
        crop=cfg.crop,
        max_shift=cfg.max_shift,
        template_dropout=cfg.template_dropout,
        same_pair=cfg.same_pair,
        seed=cfg.seed,
    )
    loader = DataLoader(
        ConcatDataset([data] * cfg.repeat) if cfg.repeat > 1 else data,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(data) >= cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    budget = TimeBudget(lr=cfg.lr, budget_s=cfg.budget_s, max_steps=cfg.max_steps, warmup_frac=cfg.warmup_frac)
    trainer = Trainer(
        model,
        loss_fn=loss_fn,
        precision=cfg.precision,
        # fp32 / bf16 need no loss scale; fp16 (the Faster R-CNN baseline on a GPU) does
        loss_scaling="dynamic" if PRECISIONS.get(cfg.precision) == "16-mixed" else None,
        max_epochs=100_000,  # the budget callback ends the run
        max_steps=cfg.max_steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        scheduler="none",
        seed=cfg.seed,
        accelerator=cfg.accelerator,
        progress=cfg.progress,
        log_every_n_steps=max(1, min(25, len(loader))),
        callbacks=[budget],
        speed=SpeedConfig(compile=False),  # Keel's default torch.compile on a GPU would eat a short budget
    )
    t0 = time.monotonic()
    result = trainer.train(loader, batch_size=cfg.batch_size)
    seconds = time.monotonic() - t0
    stats = {
        "steps": result.global_step,
        "epochs": round(result.global_step * cfg.batch_size / max(1, len(train_records)), 1),
        "train_seconds": round(seconds, 1),
        "images_per_s": round(result.global_step * cfg.batch_size / max(seconds, 1e-9), 1),
        "precision": result.precision.name,
        "train_loss": result.metrics.get("train_loss"),
    }
    log.info("trained %s: %s", cfg.model, stats)
    return stats


def main(cfg: PcbTrainConfig) -> tuple[Any, dict[str, Any]]:
    """Trains, scores the held-out part and registers the model (alias ``production``).

    Returns:
        ``(ModelVersion or None, report)``; the report has the split, run statistics and held-out metrics.
    """
    list_file = Path(cfg.list_file) if cfg.list_file else _default_list()
    records = read_list(list_file, cfg.data_dir)
    train_records, held = split_records(records, split=cfg.split, holdout=cfg.holdout, seed=cfg.seed)
    held_groups = sorted({r.group for r in held})
    log.info("%d training pairs, %d held out (%s split: %s)", len(train_records), len(held), cfg.split, held_groups)
    source = None
    if cfg.init is not None:  # fine-tune a trained detector: its weights and architecture, this run's recipe
        from apps.pcb_inspection.edge import load_source
        from core.registry import ModelRegistry

        source = load_source(cfg.init, registry=ModelRegistry(cfg.registry_root))
        log.info("training goes on from %s", source.source)
    model, stats = fit(cfg, train_records, model=None if source is None else source.model)
    device = "cuda" if cfg.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    predictor = PcbPredictor(
        model.to(device), score_threshold=cfg.score_threshold, device=device, use_template=cfg.template_dropout < 1.0
    )
    metrics = pcb_metrics(detect_records(predictor, held), held, threshold=cfg.score_threshold) if held else {}
    report = {
        "split": cfg.split,
        "held_out_groups": held_groups,
        "n_train": len(train_records),
        "n_held_out": len(held),
        "scored_with_template": predictor.use_template,
    }
    report.update(train=stats, metrics=metrics)
    if cfg.register_as is None:
        return None, report
    from core.registry import ModelRegistry, fingerprint_file

    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    flat.update({f"ap50_{k}": v for k, v in metrics.get("map50_per_class", {}).items()})
    version = ModelRegistry(cfg.registry_root).register(
        cfg.register_as,
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        architecture=cfg.model if source is None else "pcb_inspection",
        config={
            "net": dataclasses.asdict(model.cfg),
            "score_threshold": cfg.score_threshold,
            "train": {**dataclasses.asdict(cfg), "list_file": str(list_file)},
            "report": report,
        },
        hparams=dataclasses.asdict(model.cfg),
        metrics=flat,
        data_fingerprint=fingerprint_file(list_file),  # the list; its label files are read back by keel eval
        parent=None if source is None else source.parent,
        aliases=("production",),
    )
    log.info("registered %s: %s", version.ref, flat)
    return version, report


def import_weights(path: Path | str, *, registry_root: str | None = None, name: str = "pcb_inspection") -> Any:
    """Registers a ``pcb_gpu_model.pt`` written by ``benchmarks/pcb_gpu.py`` (alias ``production``), with the
    metrics of its run when ``pcb_gpu.json`` lies next to it."""
    from core.registry import ModelRegistry, fingerprint_file

    path = Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    PcbDetector(PcbDetectorConfig(**blob["net"])).load_state_dict(blob["state_dict"])  # refuses a mismatched file
    report_path = path.with_name("pcb_gpu.json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    metrics = {k: v for k, v in report.get("metrics", {}).items() if not isinstance(v, dict)}
    return ModelRegistry(registry_root).register(
        name,
        blob["state_dict"],
        architecture=str(report.get("config", {}).get("model", "pcb_inspection")),
        config={
            "net": blob["net"],
            "score_threshold": float(blob["score_threshold"]),
            "imported_from": str(path),
            "train": report.get("config", {}),
            "report": report,
        },
        hparams=blob["net"],
        metrics=metrics,
        data_fingerprint=fingerprint_file(path),
        aliases=("production",),
    )


def _default_list() -> Path:
    from core.config import data_dir

    root = data_dir()
    if root is None:
        raise FileNotFoundError("no DeepPCB data: set KEEL_DATA_DIR or pass --list (a DeepPCB list file)")
    return root / "pcb" / "DeepPCB" / "PCBData" / "trainval.txt"


def _parse(argv: list[str] | None = None) -> PcbTrainConfig | str:
    """The run's config from a recipe and overrides, or the path given to ``--import-weights``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cpu", choices=RECIPES.names())
    p.add_argument("--import-weights", default=None, help="register a pcb_gpu_model.pt instead of training")
    for field in dataclasses.fields(PcbTrainConfig):
        if field.name != "progress":
            p.add_argument(f"--{field.name.replace('_', '-')}", default=None)
    args = vars(p.parse_args(argv))
    if args["import_weights"] is not None:
        return str(args["import_weights"])
    args.pop("import_weights")
    base = RECIPES.get(args.pop("recipe"))
    types = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(base)}
    overrides: dict[str, Any] = {}
    for name, value in args.items():
        if value is None:
            continue
        kind = types[name]
        if kind is type(None):  # fields defaulting to None: budget_s and stage2_lr are numbers, the rest are strings
            kind = float if name in ("budget_s", "stage2_lr") else str
        overrides[name] = None if value.lower() == "none" else kind(value)
    return dataclasses.replace(base, **overrides)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parsed = _parse()
    if isinstance(parsed, str):
        print(json.dumps({"registered": import_weights(parsed).ref}))
    else:
        version, report = main(parsed)
        print(json.dumps({"registered": version.ref if version else None, **report}))
