"""Fine-tune a pretrained backbone on PneumoniaMNIST and register it (``medical``, alias ``production``).

Recipe (SPEC 3.5): the labelled training images (all of them, or a stratified ``label_fraction``) are
split into a fitting part and a held-out part (``holdout_frac``, stratified), used for early stopping,
temperature scaling and nothing else; the dev ``val`` split is never touched. Then, per ensemble member:

1. warm-up: backbone frozen (ImageNet batch-norm statistics kept), only the head trains;
2. fine-tuning: everything unfrozen with layer-wise learning rates (the head at ``head_lr``, the top
   backbone stage at ``lr``, each stage below x ``layer_decay``), cosine decay after a linear warm-up;
   early stopping on the held-out AUC (ties broken by the held-out loss), the best weights kept.

Class imbalance (74% pneumonia): the loss weights both classes equally (``pos_weight = n_normal / n_pneumonia``),
so the network's logit carries no class prior; calibration adds the training prior back and the decision
threshold is set for ``decision_prior`` (default: the training prevalence; state the prevalence where the model
is used to shift it, see :class:`apps.medical.model.MedicalPredictor`). Augmentation:
:func:`apps.medical.data.augment_batch`. Both phases run through :class:`core.training.Trainer`.

Run::

    python -m apps.medical.train                                  # the full recipe (a GPU helps)
    python -m apps.medical.train --finetune-epochs 2 --members 1  # shorter
    keel train medical --label-fraction 0.1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from apps.medical.calibration import binary_metrics, fit_temperature
from apps.medical.data import DEV_FILE, XraySplit, augment_batch, label_subset, load_split, stratified_split
from apps.medical.model import MedicalNet, MedicalNetConfig, MedicalPredictor, net_config_dict, pretrained_net
from core.config import data_dir
from core.registry import CONVERTERS, ModelNotFoundError, ModelRegistry, ModelVersion, fingerprint_file, import_weights
from core.training import Trainer
from core.training.module import build_scheduler

__all__ = [
    "FineTuneModule",
    "MedicalTrainConfig",
    "balanced_bce",
    "calibrate",
    "default_data_path",
    "fit_member",
    "fit_predictor",
    "main",
    "split_labelled",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MedicalTrainConfig:
    """Every setting of a run (recorded in the registry entry)."""

    data_path: str | None = None  # npz; default <data dir>/medical/pneumoniamnist_dev.npz
    split: str = "train"
    label_fraction: float = 1.0  # stratified share of the labelled images used (label-efficiency runs)
    holdout_frac: float = 0.15  # of those, held out for early stopping and calibration
    backbone: str = "efficientnet_lite0-imagenet"  # registry ref of imported weights, or "timm:<n>" / "torchvision:<n>"
    pretrained: bool = True  # False: the same architecture from random initialisation
    input_size: int = 64
    dropout: float = 0.2
    members: int = 1  # ensemble size (different seeds; logits averaged)
    warmup_epochs: int = 1  # frozen-backbone epochs (pretrained only)
    finetune_epochs: int = 6
    min_steps: int = 60  # small label fractions: at least this many fine-tuning steps
    min_epoch_steps: int = 10  # fewer labels than this many batches are repeated within an epoch
    patience: int = 2  # epochs without a better held-out AUC before stopping
    patience_steps: int = 40  # ... but never fewer steps than this
    batch_size: int = 64
    lr: float = 1e-3  # top backbone stage
    head_lr: float = 3e-3
    layer_decay: float = 0.75
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1
    augment: bool = True
    mixup: float = 0.0  # mixup (Zhang et al. 2018) Beta(a, a) parameter during fine-tuning; 0: off
    min_holdout_for_bias: int = 100  # held-out images needed to fit the calibration bias as well as T
    decision_prior: float | None = None  # prevalence the decision is made for; None: the training prevalence
    tta: int = 0  # test-time augmentation: augmented views averaged with the image (calibrated with them)
    precision: str = "auto"
    seed: int = 0
    progress: bool = True
    name: str = "medical"
    registry_root: str | None = None
    torch_threads: int = 0  # 0: torch default


def balanced_bce(logits: torch.Tensor, y: torch.Tensor, *, pos_weight: float) -> torch.Tensor:
    """BCE weighting both classes equally (``pos_weight = n_normal / n_pneumonia``), mean weight 1; soft (mixup)
    targets get the weights' mix."""
    weight = (y * pos_weight + (1 - y)) / ((1 + pos_weight) / 2)
    return F.binary_cross_entropy_with_logits(logits, y, weight=weight)


class FineTuneModule(pl.LightningModule):
    """Balanced BCE on augmented batches; validation AUC with early stopping and best-weight tracking."""

    def __init__(
        self,
        net: MedicalNet,
        groups: list[dict[str, Any]],
        *,
        pos_weight: float,
        augment: bool,
        weight_decay: float,
        warmup_steps: int,
        total_steps: int,
        patience: int,
        mixup: float = 0.0,
    ) -> None:
        super().__init__()
        self.mixup = mixup
        self.net = net
        self.groups = groups
        self.pos_weight = pos_weight
        self.augment = augment
        self.weight_decay = weight_decay
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.patience = patience
        self.best: tuple[float, float] = (-math.inf, -math.inf)  # (AUC, -loss): ties on AUC go to the lower loss
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return balanced_bce(logits, y, pos_weight=self.pos_weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, y = batch
        x = images.float() / 255
        if self.augment:
            x = augment_batch(x)
        if self.mixup > 0:  # convex mixes of image pairs and of their labels
            lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            perm = torch.randperm(x.shape[0], device=x.device)
            x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
        loss = self._loss(self.net(x), y)
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, y = batch
        self._val.append((self.net(images.float() / 255).float().cpu(), y.cpu()))

    def on_validation_epoch_end(self) -> None:
        logits, y = (torch.cat(t) for t in zip(*self._val, strict=True))
        self._val.clear()
        loss = float(self._loss(logits, y))
        auc = float(roc_auc_score(y.numpy(), logits.numpy())) if y.min() != y.max() else 0.5
        self.log_dict({"val_auc": auc, "val_loss": loss})
        if (auc, -loss) > self.best:
            self.best, self.bad_epochs = (auc, -loss), 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.net.state_dict().items()})
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                self.trainer.should_stop = True

    def configure_optimizers(self) -> Any:
        groups = [{**g, "weight_decay": self.weight_decay} for g in self.groups]
        optimizer = torch.optim.AdamW(groups)
        scheduler = build_scheduler(
            optimizer, name="cosine", warmup_steps=self.warmup_steps, total_steps=self.total_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def default_data_path() -> Path:
    root = data_dir()
    if root is None or not (root / DEV_FILE).is_file():
        raise FileNotFoundError(f"no PneumoniaMNIST data: give --data or set KEEL_DATA_DIR (looked for {DEV_FILE})")
    return root / DEV_FILE


def _backbone(cfg: MedicalTrainConfig, registry: ModelRegistry) -> tuple[MedicalNet, ModelVersion | None]:
    """The network to fine-tune and the registry entry its weights (or architecture) came from."""
    if ":" in cfg.backbone:  # "timm:<name>" / "torchvision:<name>": an architecture without weights
        if cfg.pretrained:
            raise ValueError(f"{cfg.backbone} names an architecture only; import weights (keel registry import)")
        return MedicalNet(MedicalNetConfig(cfg.backbone, input_size=cfg.input_size, dropout=cfg.dropout)), None
    try:
        registry.get(cfg.backbone)
    except ModelNotFoundError:
        packaged = [c for c in CONVERTERS.names() if CONVERTERS.get(c).default_name == cfg.backbone.split("@")[0]]
        if not packaged or CONVERTERS.get(packaged[0]).packaged_file is None:
            raise
        log.warning("%s is not in the registry yet: importing the packaged weights (%s)", cfg.backbone, packaged[0])
        import_weights(packaged[0], registry=registry)
    net, version = pretrained_net(registry, cfg.backbone, input_size=cfg.input_size, dropout=cfg.dropout)
    if not cfg.pretrained:
        net = MedicalNet(net.cfg)  # the same architecture and input statistics, fresh weights
    return net, version


def _tiled(fit: XraySplit, cfg: MedicalTrainConfig) -> XraySplit:
    """A few labels repeated up to ``min_epoch_steps`` batches per epoch: Lightning's per-epoch cost (and a
    validation after every 1-step epoch) would otherwise dominate the 1%-label runs."""
    reps = math.ceil(cfg.min_epoch_steps * cfg.batch_size / len(fit))
    return fit if reps <= 1 else fit.take(np.tile(np.arange(len(fit)), reps))


def _run_phase(
    net: MedicalNet, fit: XraySplit, held: XraySplit, cfg: MedicalTrainConfig, *, epochs: int, groups: list[dict]
) -> dict[str, Any]:
    fit = _tiled(fit, cfg)
    steps_per_epoch = math.ceil(len(fit) / cfg.batch_size)
    total = epochs * steps_per_epoch
    module = FineTuneModule(
        net,
        groups,
        pos_weight=float((fit.labels == 0).sum() / max(1, (fit.labels == 1).sum())),
        augment=cfg.augment,
        weight_decay=cfg.weight_decay,
        warmup_steps=int(cfg.warmup_frac * total),
        total_steps=total,
        patience=max(cfg.patience, math.ceil(cfg.patience_steps / steps_per_epoch)),
        mixup=cfg.mixup if any(g["name"] != "head" for g in groups) else 0.0,  # not in the frozen warm-up
    )
    trainer = Trainer(
        module,
        precision=cfg.precision,
        max_epochs=epochs,
        seed=cfg.seed,
        progress=cfg.progress,
        log_every_n_steps=min(50, steps_per_epoch),
    )
    result = trainer.train(fit.dataset(), held.dataset(), batch_size=cfg.batch_size)
    if module.best_state is not None:
        net.load_state_dict(module.best_state)
    return {
        "epochs_run": result.epoch,  # Lightning counts an epoch when it ends, also one cut short by early stopping
        "steps": result.global_step,
        "best_val_auc": module.best[0],
        "precision": result.precision.name,
    }


def fit_member(
    net: MedicalNet, fit: XraySplit, held: XraySplit, cfg: MedicalTrainConfig, *, pretrained: bool
) -> dict[str, Any]:
    """Warm-up (pretrained only) then fine-tuning of one network; returns what each phase did."""
    phases: dict[str, Any] = {}
    per_epoch = math.ceil(len(_tiled(fit, cfg)) / cfg.batch_size)
    if pretrained and cfg.warmup_epochs > 0:
        net.set_backbone_trainable(False)
        head = [{"params": list(net.head.parameters()), "lr": cfg.head_lr, "name": "head"}]
        epochs = max(cfg.warmup_epochs, math.ceil(cfg.min_steps / 4 / per_epoch))
        phases["warmup"] = _run_phase(net, fit, held, cfg, epochs=epochs, groups=head)
    net.set_backbone_trainable(True)
    decay = cfg.layer_decay if pretrained else 1.0  # layer-wise rates only make sense for pretrained layers
    head_lr = cfg.head_lr if pretrained else cfg.lr
    groups = net.param_groups(lr=cfg.lr, head_lr=head_lr, layer_decay=decay)
    epochs = max(cfg.finetune_epochs, math.ceil(cfg.min_steps / per_epoch))
    phases["finetune"] = _run_phase(net, fit, held, cfg, epochs=epochs, groups=groups)
    return phases


def fit_predictor(
    data: XraySplit, cfg: MedicalTrainConfig, registry: ModelRegistry
) -> tuple[MedicalPredictor, dict[str, Any], ModelVersion | None]:
    """Trains ``cfg.members`` networks on ``data`` (after the label subset) and calibrates them."""
    labelled, fit, held = split_labelled(data, cfg)
    nets, phases, backbone = [], [], None
    for member in range(cfg.members):
        torch.manual_seed(cfg.seed * 1000 + member)
        net, backbone = _backbone(cfg, registry)
        member_cfg = dataclasses.replace(cfg, seed=cfg.seed * 1000 + member)
        phases.append(fit_member(net, fit, held, member_cfg, pretrained=cfg.pretrained and backbone is not None))
        nets.append(net.cpu().eval())  # Lightning leaves it on the training device
    prior = float(labelled.labels.mean())
    predictor = MedicalPredictor(nets, train_prior=prior, decision_prior=cfg.decision_prior, tta=cfg.tta)
    metrics = calibrate(predictor, held, min_holdout_for_bias=cfg.min_holdout_for_bias)
    info = {"n_labelled": len(labelled), "n_fit": len(fit), "n_holdout": len(held), "phases": phases}
    info["holdout_metrics"] = metrics
    return predictor, info, backbone


def split_labelled(data: XraySplit, cfg: MedicalTrainConfig) -> tuple[XraySplit, XraySplit, XraySplit]:
    """``(labelled, fit, held)``: the label subset of ``data`` and its fitting / held-out parts (deterministic in
    ``cfg.seed``, so a registered model's recipe gives back the exact images it was fitted and calibrated on)."""
    labelled = data.take(label_subset(data.labels, cfg.label_fraction, seed=cfg.seed))
    counts = np.bincount(labelled.labels, minlength=2)
    if counts.min() < 2:
        raise ValueError(
            f"{len(labelled)} labelled images ({counts[0]} normal, {counts[1]} pneumonia) cannot give training and "
            "held-out images of both classes; use a larger label fraction"
        )
    rest, held_idx = stratified_split(labelled.labels, cfg.holdout_frac, seed=cfg.seed)
    return labelled, labelled.take(rest), labelled.take(held_idx)


def calibrate(predictor: MedicalPredictor, held: XraySplit, *, min_holdout_for_bias: int) -> dict[str, float]:
    """Fits the predictor's temperature (and, with enough held-out images, its bias) on ``held``, in place;
    returns its held-out metrics. Two parameters need more than a few dozen images; below that only T is fitted."""
    logits = predictor.logits(held.images).numpy()
    prior = predictor.train_prior
    predictor.temperature, predictor.bias = fit_temperature(
        logits, held.labels, bias=math.log(prior / (1 - prior)), fit_bias=len(held) >= min_holdout_for_bias
    )
    z = torch.from_numpy(logits)
    return binary_metrics(held.labels, predictor.calibrated(z).numpy(), predictor.decide(z).numpy())


def main(cfg: MedicalTrainConfig) -> ModelVersion:
    """Trains, calibrates and registers the model (alias ``production``); returns the new version."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    path = Path(cfg.data_path) if cfg.data_path else default_data_path()
    data = load_split(path, cfg.split)
    registry = ModelRegistry(cfg.registry_root)
    start = time.perf_counter()
    predictor, info, backbone = fit_predictor(data, cfg, registry)
    seconds = time.perf_counter() - start
    net_cfg = predictor.medical_nets[0].cfg
    fingerprint = fingerprint_file(path)
    config = {
        "kind": "medical",
        "net": net_config_dict(net_cfg),
        "backbone": {"ref": backbone.ref if backbone else None, "pretrained": cfg.pretrained},
        "train": {"data_path": str(path.resolve()), "split": cfg.split, "data_fingerprint": fingerprint, **info},
        "recipe": dataclasses.asdict(cfg),
        "calibration": predictor.registry_state()["calibration"],
    }
    metrics = {f"holdout_{k}": v for k, v in info["holdout_metrics"].items()}
    metrics["train_seconds"] = seconds
    version = registry.register(
        cfg.name,
        predictor.registry_state(),
        architecture=f"medicalnet:{net_cfg.architecture}",
        config=config,
        hparams=dataclasses.asdict(cfg),
        metrics=metrics,
        data_fingerprint=fingerprint,
        parent=backbone.ref if backbone and cfg.pretrained else None,
        aliases=("production",),
    )
    log.info("registered %s in %.0f s: %s", version.ref, seconds, metrics)
    return version


def _parse_args(argv: list[str] | None = None) -> MedicalTrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(MedicalTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            kind = float if str(f.type).startswith("float") else type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default)
    return MedicalTrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(main(_parse_args()).to_dict()["metrics"])
